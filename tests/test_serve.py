"""`eaglecache serve`: a real `vllm serve` with the draft on loopback, an API key, spec-decode metrics, clean exit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.serve.export import build_untrained_draft
from eaglecache.serve.metrics import counters_from_prometheus
from eaglecache.serve.server import serve_command

API_KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url, headers=None, data=None, timeout=30):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read().decode()


def _start_server(root, tiny_target, draft) -> dict:
    port = _free_port()
    env = {**os.environ, "EAGLECACHE_API_KEY": API_KEY}
    log_path = root / f"server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eaglecache.cli", "serve", "--draft", str(draft), "--port", str(port),
             f"target.path={tiny_target}", "target.kv_cache_gib=0.25"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # engine start takes 30-60 s idle, minutes on a busy shared box
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if _get(base + "/health", timeout=5)[0] == 200:
                return {"proc": proc, "base": base, "port": port, "log": log_path}
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(2)
    proc.kill()
    pytest.fail("server did not become healthy in 900 s")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_target):
    """The module's server, started on first use and again after a test stopped it (the SIGTERM test), so
    every test stands alone in any order while the usual order starts one."""
    root = tmp_path_factory.mktemp("serve")
    draft = build_untrained_draft(tiny_target, root / "draft", seed=0)
    started: list[dict] = []

    def running() -> dict:
        if not started or started[-1]["proc"].poll() is not None:
            started.append(_start_server(root, tiny_target, draft))
        return started[-1]

    yield running
    for server in started:
        if server["proc"].poll() is None:
            server["proc"].kill()
            server["proc"].wait()


@pytest.fixture
def server(servers):
    return servers()


def _chat(base, key):
    body = json.dumps({"model": "ignored-by-check", "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 16, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return _get(base + "/v1/chat/completions", headers, body, timeout=120)


def test_chat_completion_and_spec_decode_metrics(server, tiny_target):
    status, models = _get(server["base"] + "/v1/models", {"Authorization": f"Bearer {API_KEY}"})
    model = json.loads(models)["data"][0]["id"]
    assert model == tiny_target.name
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 16, "temperature": 0}).encode()
    status, text = _get(server["base"] + "/v1/chat/completions",
                        {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}, body, 120)
    answer = json.loads(text)
    assert status == 200 and answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0

    status, metrics = _get(server["base"] + "/metrics")
    counters = counters_from_prometheus(metrics)
    assert counters.drafts > 0 and counters.draft_tokens == 3 * counters.drafts
    assert len(counters.accepted_per_pos) == 3


def test_api_key_is_required_and_not_on_the_command_line(server):
    with pytest.raises(urllib.error.HTTPError) as err:
        _chat(server["base"], key=None)
    assert err.value.code == 401
    cmdlines = [" ".join(p.cmdline()) for p in [psutil.Process(server["proc"].pid),
                                                 *psutil.Process(server["proc"].pid).children(recursive=True)]]
    assert not any(API_KEY in c for c in cmdlines)
    assert any("--speculative-config" in c and "eagle3" in c for c in cmdlines)


def test_sigterm_stops_the_server_and_its_children(server):
    proc = server["proc"]
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode in (0, 128 + signal.SIGTERM), server["log"].read_text()[-2000:]
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive
    with socket.socket() as sock:  # nothing listens on the port any more (TIME_WAIT aside)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server["port"]))


def test_command_is_built_from_the_config(tmp_path, tiny_target):
    draft = build_untrained_draft(tiny_target, tmp_path / "draft", seed=0)
    config = load_config(None, [f"target.path={tiny_target}", "target.tensor_parallel_size=2",
                                "target.max_model_len=1024", "serve.num_speculative_tokens=5"])
    command = serve_command(config, tiny_target, draft, "127.0.0.1", 8123)
    joined = " ".join(command)
    assert "--tensor-parallel-size 2" in joined and "--max-model-len 1024" in joined
    assert "--host 127.0.0.1 --port 8123" in joined
    spec = json.loads(command[command.index("--speculative-config") + 1])
    assert spec == {"method": "eagle3", "model": str(draft), "num_speculative_tokens": 5}
    assert load_config(None).serve.host == "127.0.0.1"


def test_busy_port_and_bad_draft_are_one_line_errors(tmp_path, capsys, tiny_target):
    draft = build_untrained_draft(tiny_target, tmp_path / "draft", seed=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["serve", "--draft", str(draft), "--port", str(port), f"target.path={tiny_target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"127.0.0.1:{port}" in err and "\n" not in err
    assert main(["serve", "--draft", str(tmp_path), "--port", "1", f"target.path={tiny_target}"]) == 2
    assert "not a draft directory" in capsys.readouterr().err
