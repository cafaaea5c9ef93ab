"""A feature cache in an S3-compatible object store: opened, inspected and trained from by URL.

moto's S3 server runs on loopback; the ``tiny_cache`` fixture's directory tree is uploaded
as it is. The client side is what a user runs: s3fs and zarr's FsspecStore, configured only
by the standard AWS environment variables (endpoint, keys, region).
"""

import argparse
import json
import logging

import numpy as np
import pytest
import torch

from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.precompute.reader import open_cache

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

    args = argparse.Namespace(cache=s3_cache, data=None, vocab=None, output=str(tmp_path / "run"))
    config = resolve_config(load_config(None, [f"target.path={tiny_target}"]), args)
    check_inputs(config, args)  # what `eaglecache train` checks before starting any rank
    cmd = launcher_command(config, args, tmp_path / "run", 29500)
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
