"""``eaglecache train``: resolve and check the run, write RUN_DIR/config.yaml, start DeepSpeed's launcher.

Inputs are checked here, once, before any rank starts (a bad path or a cache made
from another target is one error line, not N tracebacks). Then
``python -m deepspeed.launcher.runner --num_gpus N [--num_nodes M --hostfile F]
--module eaglecache.train.main --run-dir RUN_DIR ...`` runs the ranks, exactly as
DeepSpeed users start their jobs; without CUDA it sets ``DS_ACCELERATOR=cpu`` (gloo)
and splits the cores between the ranks.

Running the same command again on the same RUN_DIR resumes from its last
committed checkpoint; a RUN_DIR holding a run with other settings is refused.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import yaml

from eaglecache.errors import UserError
from eaglecache.formats import run as run_format
from eaglecache.train import peer_loss
from eaglecache.train.signals import run_launcher

log = logging.getLogger(__name__)


def resolve_config(config):
    """The config as the ranks will read it: target path and sequence length made explicit."""
    from eaglecache.target import resolve_target

    resolved = config.model_copy(deep=True)
    resolved.target.path = str(resolve_target(config))
    resolved.train.max_seq_length = config.train_max_seq_length
    return resolved


def check_inputs(config, *, cache: Optional[str], data: Optional[str], vocab: Optional[str]) -> None:
    """Fail early, with one line, on what every rank would fail on."""
    from eaglecache.target import weights_hash

    tc = config.train
    if tc.source == "cache":
        from eaglecache.formats.cache_reader import open_cache

        if not cache:
            raise UserError("train.source=cache needs --cache DIR (a feature cache from `eaglecache precompute`)")
        features = open_cache(cache)
        stored_hash = features.metadata.get("target_weights_hash")
        if stored_hash and stored_hash != weights_hash(config.target.path):
            raise UserError(f"{cache} was computed from another target than {config.target.path} "
                            "(target_weights_hash differs)")
        num_samples = len(features.sample_ids)
        stored_aux = features.metadata["aux_layer_ids"]
    else:
        from eaglecache.formats.dataset import open_dataset
        from eaglecache.target import target_layer_count

        if not data:
            raise UserError("train.source=online needs --data DIR (a prepared data set)")
        num_samples = len(open_dataset(data))
        stored_aux = config.precompute_aux_layer_ids(target_layer_count(config.target.path))  # what online computes
    config.draft_aux_layer_ids(stored_aux)
    if num_samples < tc.global_batch_size:
        raise UserError(f"{num_samples} samples are fewer than one global batch (train.global_batch_size "
                        f"{tc.global_batch_size})")
    if vocab:
        from eaglecache.formats.vocab import read_vocab

        read_vocab(vocab)
    lc = tc.launcher
    if lc.num_nodes > 1 and not lc.hostfile:
        raise UserError("train.launcher.num_nodes > 1 needs train.launcher.hostfile")
    if lc.hostfile and not Path(lc.hostfile).is_file():
        raise UserError(f"train.launcher.hostfile {lc.hostfile}: no such file")


def write_run_config(config, run_dir: Path) -> None:
    """RUN_DIR/config.yaml; refuses to overwrite a started run's settings with other ones."""
    from eaglecache.config import load_config
    from eaglecache.train.checkpoint import run_fingerprint

    path = run_dir / run_format.CONFIG
    if path.is_file() and run_format.committed_steps(run_dir):
        started = load_config(path)
        if run_fingerprint(started) != run_fingerprint(config):
            full = started.to_dict()
            differ = ", ".join(f"{key}={_lookup(full, key)}" for key in setting_differences(
                started.identity("target", "train", vllm=False), config.identity("target", "train", vllm=False)))
            raise UserError(f"{run_dir} holds a run with other target/train settings (it has {differ}); "
                            "use a new --output, or the same settings to resume it")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)


def setting_differences(started: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted keys of the identity settings where ``started`` differs from ``now`` (either may lack a key:
    a setting at the value that leaves it out of the identity)."""
    out = []
    for key in sorted(set(started) | set(now)):
        a, b = started.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += setting_differences(a, b, f"{prefix}{key}.")
        elif a != b or (key in started) != (key in now):
            out.append(f"{prefix}{key}")
    return out


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a single-node rendezvous."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def master_port(launcher) -> int:
    if launcher.master_port is not None:
        return launcher.master_port
    return 29500 if launcher.num_nodes > 1 else free_port()


def launcher_command(config, run_dir: Path, port: int, *, cache: Optional[str] = None, data: Optional[str] = None,
                     vocab: Optional[str] = None) -> list[str]:
    from eaglecache.formats.cache_reader import is_url

    lc = config.train.launcher
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(lc.num_gpus),
           "--master_port", str(port)]
    if lc.hostfile:
        cmd += ["--hostfile", lc.hostfile, "--num_nodes", str(lc.num_nodes)]
    cmd += ["--module", "eaglecache.train.main", "--run-dir", str(run_dir), "--under-launcher"]
    for flag, value in (("--cache", cache), ("--data", data), ("--vocab", vocab)):
        if value:
            cmd += [flag, value if is_url(value) else str(Path(value).resolve())]  # s3://... stays a URL
    return cmd


def launcher_env(config) -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.train.launcher.num_gpus)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_train(config, *, output: str | Path, cache: Optional[str] = None, data: Optional[str] = None,
              vocab: Optional[str] = None, overwrite: bool = False) -> int:
    """Train into the run directory ``output`` (resuming the run there) from a feature ``cache`` (a
    directory or URL) or, with train.source=online, a prepared ``data`` set; ``vocab`` for a reduced
    vocabulary. Returns the launcher's exit status; ``overwrite`` as `--overwrite` (eaglecache/outputs.py)."""
    from eaglecache import outputs

    outputs.claim_output(output, overwrite, "train", outputs.train_run)
    run_dir = Path(output).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_config(config)
    check_inputs(config, cache=cache, data=data, vocab=vocab)
    write_run_config(config, run_dir)
    port = master_port(config.train.launcher)
    cmd = launcher_command(config, run_dir, port, cache=cache, data=data, vocab=vocab)
    log.info("starting: %s", " ".join(cmd))
    env = launcher_env(config)
    peer_loss.clear(run_dir)
    try:
        rc, received = run_launcher(cmd, env, failed=lambda: peer_loss.recorded(run_dir) is not None)
    finally:
        if env.get("DS_ACCELERATOR") == "cpu":
            remove_cpu_allreduce_buffers(port)
    multi_node = config.train.launcher.num_nodes > 1
    # pdsh's status is a remote command's or ssh's own 255, never a signal's
    status = rc if multi_node and rc > 0 else exit_status(rc)
    if received is not None:
        # on a line of its own: the ranks were stopped mid progress bar
        print(f"\nerror: stopped by {signal_name(received)}; run the same command again to resume from the last "
              f"checkpoint in {run_dir / run_format.CHECKPOINTS}", file=sys.stderr)
        return 128 + received
    lost = peer_loss.recorded(run_dir) if status != 0 else None
    if lost:
        print(f"error: {lost}; run the same command again once the nodes are back (or with a hostfile of healthy "
              f"ones) to resume from the last checkpoint in {run_dir / run_format.CHECKPOINTS}", file=sys.stderr)
        return peer_loss.PEER_LOST_EXIT
    elif status != 0:
        killed = f"a process was killed by {signal_name(status - 128)}; " if status != rc else ""
        print(f"error: training exited with status {status} ({killed}the rank logs above say why); "
              f"run the same command again to resume from the last checkpoint in {run_dir / run_format.CHECKPOINTS}",
              file=sys.stderr)
    return status


def exit_status(returncode: int) -> int:
    """The launcher's return code as a shell reports it: 128 + N for a process killed by signal N.

    subprocess gives -N when the launcher itself was killed; DeepSpeed's per-node launcher passes a
    killed rank's -N to ``sys.exit``, which the OS truncates to 256 - N. (Our ranks exit with 0, 1 or 2.)
    """
    if returncode < 0:
        return 128 - returncode
    if returncode > 128 and (256 - returncode) in {int(s) for s in signal.valid_signals()}:
        return 128 + (256 - returncode)
    return returncode


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal without a name of its own
        return f"signal {number}"


def remove_cpu_allreduce_buffers(port: int) -> None:
    """Remove the shared-memory buffers DeepSpeed's CPU all-reduce left for the run on ``port``.

    Each rank of a CPU run creates a ~70 MB ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    and nothing ever removes it, so every run left them in RAM until reboot. We remove them once the
    launcher has returned, i.e. after the ranks: inside a rank, unlinking them coincided with aborts at
    interpreter exit in CI.
    """
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        try:
            path.unlink()
        except OSError:
            pass  # already gone
