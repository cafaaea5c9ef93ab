"""The training run directory (``eaglecache.run`` v1, docs/formats.md section 4): checkpoints, resume, final weights.

A checkpoint ``checkpoints/step-XXXXXXX/`` is DeepSpeed's own (model partitions,
optimizer, scheduler) plus, in its client state, the loader position, and one
``rng-rank-R.pt`` per rank. It counts only once its ``COMMIT`` file exists: rank 0
writes it after every rank has finished writing, so a run killed mid-save leaves
an uncommitted directory that resume ignores and the next save removes. The last
``keep_checkpoints`` committed ones are kept.

``final/`` holds ``model.safetensors`` (16-bit weights gathered from ZeRO-3
partitions, vLLM's names, trainable tensors only, plus d2t/t2d for a reduced
vocab) and ``draft.json`` (the architecture export needs). It is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from eaglecache.errors import UserError

RUN_FORMAT, RUN_VERSION = "eaglecache.run", 1
COMMIT = "COMMIT"
# Test hook: the process SIGKILLs itself right after committing this step (a real, unclean death).
KILL_AFTER_CHECKPOINT_ENV = "EAGLECACHE_KILL_AFTER_CHECKPOINT"


def tag_of(step: int) -> str:
    return f"step-{step:07d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# train settings that do not change what is trained (how it is launched, logged, read, saved)
NOT_RESULT_KEYS = ("launcher", "log_interval", "checkpoint_interval", "keep_checkpoints", "loader_workers", "prefetch")


def run_fingerprint(config) -> str:
    """sha256 of the settings a resumed run must share with the run it continues."""
    import hashlib

    tree = config.to_dict()
    train = {k: v for k, v in tree["train"].items() if k not in NOT_RESULT_KEYS}
    return hashlib.sha256(json.dumps({"target": tree["target"], "train": train}, sort_keys=True).encode()).hexdigest()


def committed_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    steps = []
    for path in root.glob("step-*"):
        if (path / COMMIT).is_file():
            steps.append(int(path.name.split("-")[1]))
    return sorted(steps)


def write_run_json(run_dir: Path, *, source_fingerprint: dict[str, Any], world_size: int,
                   total_steps: int, config_hash: str) -> None:
    """run.json: what this run trains on and how; a resume must agree with it."""
    from eaglecache import __version__

    path = run_dir / "run.json"
    doc = {"format": RUN_FORMAT, "version": RUN_VERSION, "code_version": __version__,
           "source": source_fingerprint, "world_size": world_size, "total_steps": total_steps,
           "config_hash": config_hash}
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("format") != RUN_FORMAT or old.get("version") != RUN_VERSION:
            raise UserError(f"{run_dir}: not an eaglecache.run v{RUN_VERSION} directory")
        for key in ("source", "config_hash", "total_steps"):
            if old.get(key) != doc[key] and committed_steps(run_dir):
                raise UserError(f"{run_dir} holds a run with another {key}; use a new --output to start over")
    write_json_atomic(path, doc)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(engine, loader, run_dir: Path, step: int, keep: int) -> Path:
    """Every rank: DeepSpeed state + loader position + RNG, then COMMIT (rank 0) and pruning."""
    root = run_dir / "checkpoints"
    tag = tag_of(step)
    rank = torch.distributed.get_rank()
    if rank == 0 and (root / tag).exists():  # an uncommitted leftover of a killed run
        shutil.rmtree(root / tag)
    _barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"loader": loader.state_dict(), "step": step},
                           save_latest=False)
    torch.save(_rng_state(), root / tag / f"rng-rank-{rank}.pt")
    _barrier()
    if rank == 0:
        write_json_atomic(root / tag / COMMIT, {"step": step, "time": time.time(),
                                                "world_size": torch.distributed.get_world_size()})
        for old in committed_steps(run_dir)[:-keep]:
            shutil.rmtree(root / tag_of(old), ignore_errors=True)
        for stale in root.glob("step-*"):
            if not (stale / COMMIT).exists() and stale.name != tag:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return root / tag


def load_checkpoint(engine, loader, run_dir: Path) -> int:
    """Resume from the newest committed checkpoint; returns its step (0 when there is none)."""
    steps = committed_steps(run_dir)
    if not steps:
        return 0
    tag = tag_of(steps[-1])
    root = run_dir / "checkpoints"
    saved_world = json.loads((root / tag / COMMIT).read_text()).get("world_size")
    world = torch.distributed.get_world_size()
    if saved_world not in (None, world):
        raise UserError(f"{root / tag} was written by {saved_world} ranks and this run has {world}: ZeRO-3 "
                        "partitions do not reshard on load (convert with DeepSpeed's ds_to_universal.py, or "
                        f"resume with {saved_world} ranks)")
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    loader.load_state_dict(client_state["loader"])
    rng_file = root / tag / f"rng-rank-{torch.distributed.get_rank()}.pt"
    if rng_file.is_file():  # absent when the world size changed; the draft uses no randomness in training
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client_state["step"])


def save_final(engine, run_dir: Path, arch_json: dict[str, Any], extra: Optional[dict[str, torch.Tensor]],
               provenance: dict[str, Any]) -> Optional[Path]:
    """Every rank (ZeRO-3 gathers): final/model.safetensors (bf16) and final/draft.json, atomically."""
    from safetensors.torch import save_file

    state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    if torch.distributed.get_rank() != 0:
        return None
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in state.items() if name in trainable}
    tensors.update({name: t.cpu().contiguous() for name, t in (extra or {}).items()})
    final = run_dir / "final"
    tmp = run_dir / f".final.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "eaglecache.draft", "dtype": "bfloat16"})
    (tmp / "draft.json").write_text(json.dumps({**arch_json, "provenance": provenance}, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final
