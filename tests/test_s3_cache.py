"""A feature cache in an S3-compatible object store: opened, inspected and trained from by URL.

moto's S3 server runs on loopback; the ``tiny_cache`` fixture's directory tree is uploaded
as it is. The client side is what a user runs: s3fs and zarr's FsspecStore, configured only
by the standard AWS environment variables (endpoint, keys, region). For transient store errors
a small proxy (``FaultyS3Proxy``) sits between the client and moto and answers every 10th
request with a 503 and cuts one response off mid-body.
"""

import contextlib
import http.client
import json
import logging
import os
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.formats.cache_reader import open_cache

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls

BUCKET = "eaglecache-test"
RUN = ["train.dtype=float32", "train.global_batch_size=2", "train.micro_batch_size=1", "train.max_steps=3",
       "train.max_seq_length=48", "train.ttt_length=3", "train.log_interval=1", "train.checkpoint_interval=100",
       "train.loader_workers=1"]


@pytest.fixture(scope="module")
def s3_cache(tiny_cache):
    """URL of a copy of ``tiny_cache`` in a loopback S3 server; AWS_* variables point at it meanwhile."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        files = [f for f in sorted(tiny_cache.rglob("*")) if f.is_file()]
        for f in files:
            client.upload_file(str(f), BUCKET, f"caches/tiny/{f.relative_to(tiny_cache).as_posix()}")
        assert len(files) > 10  # cache.json, part.json and every shard's arrays and metadata
        yield f"s3://{BUCKET}/caches/tiny"
    server.stop()


def test_opens_and_reads_the_same_as_the_local_copy(s3_cache, tiny_cache):
    remote, local = open_cache(s3_cache), open_cache(tiny_cache)
    assert remote.metadata == local.metadata
    assert np.array_equal(remote.sample_ids, local.sample_ids) and remote.total_tokens == local.total_tokens
    assert len(remote.shard_paths) == len(local.shard_paths) > 1
    for sample_id in (int(local.sample_ids[0]), int(local.sample_ids[-1])):  # first and last shard
        a, b = remote.read(sample_id), local.read(sample_id)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.aux, b.aux) and torch.equal(a.final, b.final)


def test_cache_info_prints_the_same_contents(s3_cache, tiny_cache, capsys):
    assert main(["cache", "info", str(tiny_cache)]) == 0
    local = capsys.readouterr().out
    assert main(["cache", "info", s3_cache]) == 0
    remote = capsys.readouterr().out
    contents = [line for line in remote.splitlines() if line.startswith(("contents", "size", "parts"))]
    assert len(contents) == 3 and all(line in local.splitlines() for line in contents)
    assert f"cache      {s3_cache} " in remote


def test_cache_verify_checks_every_shard_in_the_bucket_and_names_damage(s3_cache, tiny_cache, capsys):
    import boto3

    assert main(["cache", "verify", s3_cache]) == 0
    shards = sum(len(record["shards"]) for record in
                 (json.loads(p.read_text()) for p in tiny_cache.glob("parts/*/part.json")))
    assert f"{shards} shards checked, 0 damaged, 0 unlisted" in capsys.readouterr().out

    # a second copy, with one flipped byte in one shard's states and one shard nobody recorded
    client, prefix = boto3.client("s3"), "caches/damaged"
    files = [f for f in sorted(tiny_cache.rglob("*")) if f.is_file()]
    victim = next(f for f in files if f.parent.name == "final")
    for f in files:
        key = f"{prefix}/{f.relative_to(tiny_cache).as_posix()}"
        body = bytearray(f.read_bytes())
        if f == victim:
            body[len(body) // 3] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
        if f.parent.parent.name == "shard-00000.zarr" or f.parent.name == "shard-00000.zarr":
            stray = key.replace("shard-00000.zarr", "shard-09999.zarr")
            client.put_object(Bucket=BUCKET, Key=stray, Body=bytes(f.read_bytes()))
    damaged = f"s3://{BUCKET}/{prefix}"
    assert main(["cache", "verify", damaged]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {damaged}/{victim.parent.parent.relative_to(tiny_cache).as_posix()}: final: checksum" in out
    assert "UNLISTED" in out and "shard-09999.zarr" in out
    assert f"{shards} shards checked, 1 damaged, " in out
    assert main(["cache", "verify", damaged, "--repair"]) == 2
    assert "works on local caches only" in capsys.readouterr().err


def test_missing_cache_url_is_one_clear_error(s3_cache):
    from eaglecache.errors import UserError

    with pytest.raises(UserError, match="no cache.json"):
        open_cache(s3_cache + "-missing")


def test_train_command_passes_the_url_to_the_ranks(s3_cache, tiny_target, tmp_path):
    from eaglecache.train.launch import check_inputs, launcher_command, resolve_config

    config = resolve_config(load_config(None, [f"target.path={tiny_target}"]))
    check_inputs(config, cache=s3_cache, data=None, vocab=None)  # what `eaglecache train` checks before any rank
    cmd = launcher_command(config, tmp_path / "run", 29500, cache=s3_cache)
    assert cmd[cmd.index("--cache") + 1] == s3_cache


def test_training_from_s3_gives_the_losses_of_the_local_copy(s3_cache, tiny_cache, tiny_target, tmp_path,
                                                            single_rank):
    from eaglecache.train.main import open_source, train

    rank, world, device = single_rank
    config = load_config(None, [f"target.path={tiny_target}", *RUN])
    losses = {}
    for name, cache in (("s3", s3_cache), ("local", str(tiny_cache))):
        run_dir = tmp_path / name
        run_dir.mkdir()
        source = open_source(config, cache, None, tiny_target, device)  # what each rank does with --cache
        train(config, run_dir, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
        losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["s3"]) == 3 and all(np.isfinite(losses["s3"]))
    assert losses["s3"] == losses["local"]  # the same bytes, so bit-identical losses


def test_ablations_run_from_a_cache_url(s3_cache, tiny_cache, tiny_target, tmp_path):
    from eaglecache.train.ablate import cache_fingerprint

    out = tmp_path / "ablate"
    assert main(["ablate", "--cache", s3_cache, "--output", str(out), "--grid", "train.ttt_length=[2]",
                 f"target.path={tiny_target}", "train.launcher.num_gpus=1", *RUN]) == 0
    record = json.loads(next(out.glob("*/variant.json")).read_text())
    assert record["status"] == "done" and record["metrics"]["step"] == 3
    assert record["fingerprint"]["cache"] == cache_fingerprint(str(tiny_cache))  # the same cache, read remotely


class FaultyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 server, failing some requests on purpose.

    Deterministic (a request counter, no randomness): request number ``503_every``, 2 x that, ...
    gets a 503 with S3's ``SlowDown`` XML error body; the first GET after request ``reset_after``
    whose answer carries more than 1 KiB (a shard's chunk) is cut after half its body and the
    connection reset (RST). Every other request is forwarded to the server and its answer relayed.
    """

    SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")

    def __init__(self, upstream: str, every: int = 10, reset_after: int = 15, head_outage: int = 0):
        self.upstream = urlsplit(upstream)
        self.every, self.reset_after, self.head_outage = every, reset_after, head_outage
        self.counts = {"requests": 0, "503": 0, "reset": 0, "HEAD": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.counts["requests"] += 1
                    number = proxy.counts["requests"]
                    proxy.counts["HEAD"] += self.command == "HEAD"
                    fail = number % proxy.every == 0 or (self.command == "HEAD"
                                                         and proxy.counts["HEAD"] <= proxy.head_outage)
                    proxy.counts["503"] += fail
                if fail:  # S3 answers a HEAD with the status alone: no error body to recognise
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(proxy.SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                with proxy._lock:
                    cut = (self.command == "GET" and len(data) > 1024 and number > proxy.reset_after
                           and proxy.counts["reset"] == 0)
                    proxy.counts["reset"] += cut
                self.send_response(answer.status, answer.reason)
                for key, value in answer.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if not cut:
                    self.wfile.write(data)
                    return
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                # SO_LINGER 0: close() sends RST, the client sees "connection reset" mid-body
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@contextlib.contextmanager
def through_proxy(**faults):
    """AWS_ENDPOINT_URL pointed at a ``FaultyS3Proxy`` in front of the moto server meanwhile; yields the proxy."""
    import s3fs

    moto_url = os.environ["AWS_ENDPOINT_URL"]
    with FaultyS3Proxy(moto_url, **faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        s3fs.S3FileSystem.clear_instance_cache()  # a client made for moto's address would bypass the proxy
        try:
            yield proxy
        finally:
            os.environ["AWS_ENDPOINT_URL"] = moto_url
            s3fs.S3FileSystem.clear_instance_cache()


def test_training_through_503s_and_a_reset_connection_gives_the_losses_without_faults(
        s3_cache, tiny_cache, tiny_target, tmp_path, single_rank):
    from eaglecache.train.main import open_source, train

    rank, world, device = single_rank
    config = load_config(None, [f"target.path={tiny_target}", *RUN])
    losses = {}
    with through_proxy() as proxy:
        for name, cache in (("faults", s3_cache), ("local", str(tiny_cache))):
            run_dir = tmp_path / name
            run_dir.mkdir()
            source = open_source(config, cache, None, tiny_target, device)
            train(config, run_dir, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
            losses[name] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert proxy.counts["503"] >= 3 and proxy.counts["reset"] == 1, proxy.counts
    assert len(losses["faults"]) == 3 and losses["faults"] == losses["local"]


def test_a_run_of_503s_on_head_requests_is_outlasted(s3_cache, tiny_cache):
    """A throttled prefix: the first 5 HEADs answered 503 (one more than botocore's default 5 attempts allow)."""
    local = open_cache(tiny_cache)
    with through_proxy(head_outage=5) as proxy:
        remote = open_cache(s3_cache)
        for sample_id in local.sample_ids[:: max(1, len(local.sample_ids) // 8)]:
            a, b = remote.read(int(sample_id)), local.read(int(sample_id))
            assert np.array_equal(a.input_ids, b.input_ids) and torch.equal(a.aux, b.aux), sample_id
    assert proxy.counts["HEAD"] > 5 and proxy.counts["503"] >= 5, proxy.counts
