"""Writing a run directory (eaglecache/formats/run.py, docs/formats.md section 4): checkpoints, resume, final weights.

A checkpoint ``checkpoints/step-XXXXXXX/`` is DeepSpeed's own (model partitions,
optimizer, scheduler) plus, in its client state, the loader position, and one
``rng-rank-R.pt`` per rank. It counts only once its ``COMMIT`` file exists: rank 0
writes it after every rank has finished writing, so a run killed mid-save leaves
an uncommitted directory that resume ignores and the next save removes. The last
``keep_checkpoints`` committed ones are kept.

COMMIT also records the size and CRC-32 of every file of the checkpoint (read
back and fsynced by rank 0 before COMMIT is written). Resume takes the newest
committed checkpoint whose files still match and warns about every newer one
it skips, naming it and what is wrong. A save that fills the disk removes its
partial directory and stops the run with one line naming the path, the bytes a
checkpoint needs and those free; the checkpoints committed before stay valid.

A checkpoint written by N ranks resumes at M ranks with the same global batch: rank 0 converts it once
with DeepSpeed's own ``ds_to_universal`` (fp32 master weights, Adam moments and step per parameter,
unpartitioned) into ``checkpoints/universal/step-XXXXXXX/`` and every rank loads that with DeepSpeed's
``load_universal``; the LR schedule and the loader position travel in the client state, and the sample
order depends on the global batch only, so the run goes on with the next step's samples.

``final/`` holds ``model.safetensors`` (16-bit weights gathered from ZeRO-3
partitions, vLLM's names, trainable tensors only, plus d2t/t2d for a reduced
vocab) and ``draft.json`` (the architecture export needs). It is written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from eaglecache.errors import UserError
from eaglecache.formats import draft as draft_format
from eaglecache.formats import run as run_format
from eaglecache.formats.run import COMMIT, committed_steps, tag_of, write_json_atomic

# Test hook: the process SIGKILLs itself right after committing this step (a real, unclean death).
KILL_AFTER_CHECKPOINT_ENV = "EAGLECACHE_KILL_AFTER_CHECKPOINT"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: a checkpoint resharded for another world size

log = logging.getLogger(__name__)


def run_fingerprint(config) -> str:
    """sha256 of the settings a resumed run must share with the run it continues: the identity of the
    target and train sections (eaglecache/section.py), without the target's vLLM-only settings, since
    training never starts vLLM. Kept: everything that can change the weights even in the last bit (the
    attention kernel, loss chunking, gradient checkpointing, dtypes)."""
    return config.fingerprint("target", "train", vllm=False)


def write_run_json(run_dir: Path, *, source_fingerprint: dict[str, Any], world_size: int,
                   total_steps: int, config_hash: str) -> None:
    """run.json: what this run trains on and how; a resume must agree with it."""
    from eaglecache import __version__

    run_format.write_run_json(run_dir, run_format.run_document(
        code_version=__version__, source_fingerprint=source_fingerprint, world_size=world_size,
        total_steps=total_steps, config_hash=config_hash))


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
    root = run_dir / run_format.CHECKPOINTS
    tag = tag_of(step)
    rank = torch.distributed.get_rank()
    if rank == 0 and (root / tag).exists():  # an uncommitted leftover of a killed run
        shutil.rmtree(root / tag)
    _barrier()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"loader": loader.state_dict(), "step": step},
                               save_latest=False)
        torch.save(_rng_state(), root / tag / f"rng-rank-{rank}.pt")
    except (OSError, RuntimeError) as exc:
        _raise_if_disk_full(exc, run_dir, root / tag, engine)
        raise
    _barrier()
    if rank == 0:
        try:
            files = _file_checksums(root / tag)
            write_json_atomic(root / tag / COMMIT, {"step": step, "time": time.time(), "files": files,
                                                    "world_size": torch.distributed.get_world_size()})
        except OSError as exc:
            _raise_if_disk_full(exc, run_dir, root / tag, engine)
            raise
        for old in committed_steps(run_dir)[:-keep]:
            shutil.rmtree(root / tag_of(old), ignore_errors=True)
            shutil.rmtree(root / UNIVERSAL / tag_of(old), ignore_errors=True)
        for stale in root.glob(run_format.TAG_GLOB):
            if not (stale / COMMIT).exists() and stale.name != tag:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return root / tag


def _crc32(path: Path, fsync: bool = False) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
        if fsync:
            os.fsync(f.fileno())
    return f"{crc:08x}"


def _file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, crc32}} of every file, each fsynced: COMMIT vouches for bytes on disk."""
    return {str(path.relative_to(directory)): {"size": path.stat().st_size, "crc32": _crc32(path, fsync=True)}
            for path in sorted(p for p in directory.rglob("*") if p.is_file())}


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a committed checkpoint (None when its files match COMMIT)."""
    try:
        files = json.loads((path / COMMIT).read_text()).get("files")
    except (OSError, ValueError) as exc:
        return f"unreadable {COMMIT} ({exc.__class__.__name__})"
    if files is None:
        return None  # written before checksums were recorded: trusted as before
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, {want['size']} were written"
        if _crc32(file) != want["crc32"]:
            return f"{name} fails its checksum"
    return None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _raise_if_disk_full(exc: BaseException, run_dir: Path, path: Path, engine) -> None:
    """One line for a full disk (torch.save reports it as a RuntimeError without errno), after removing
    the partial checkpoint; any other error is left to the caller."""
    free = shutil.disk_usage(run_dir).free
    steps = committed_steps(run_dir)
    if steps:
        needed = _dir_size(run_format.checkpoint_dir(run_dir, steps[-1]))
    else:  # bf16 weights + fp32 master weights and two Adam moments of what trains, bf16 of the rest;
        # ZeRO-3 leaves a partition in .data, the full size in ds_numel
        needed = sum(getattr(p, "ds_numel", p.numel()) * (14 if p.requires_grad else 2)
                     for p in engine.module.parameters())
    disk_full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) \
        or "No space left" in str(exc) or "file write failed" in str(exc) or free < needed
    if not disk_full:
        return
    shutil.rmtree(path, ignore_errors=True)  # uncommitted anyway; its space is what the next try needs
    kept = f"checkpoint {tag_of(steps[-1])} is intact" if steps else "no checkpoint was committed before"
    raise UserError(f"disk full writing checkpoint {path}: it needs about {needed:,} bytes and "
                    f"{shutil.disk_usage(run_dir).free:,} are free; {kept}; free space and rerun the same "
                    "command to resume") from None


def _choose_checkpoint(run_dir: Path) -> int:
    """Rank 0: the newest committed step whose files match COMMIT, warning about each newer one; 0 if none."""
    for step in reversed(committed_steps(run_dir)):
        path = run_format.checkpoint_dir(run_dir, step)
        problem = checkpoint_problem(path)
        if problem is None:
            return step
        log.warning("checkpoint %s is damaged (%s): not resuming from it, trying the one before", path, problem)
    return 0


def choose_resume(run_dir: Path) -> tuple[int, Optional[int]]:
    """(step, the world size that wrote it) of the checkpoint this run resumes from, the same on every rank
    (rank 0 chooses: the newest intact committed one); (0, None) when there is none. Called before the
    engine exists, since loading at another world size needs DeepSpeed's ``load_universal`` setting."""
    chosen = [_choose_checkpoint(run_dir) if torch.distributed.get_rank() == 0 else 0, None]
    if chosen[0]:
        chosen[1] = json.loads((run_format.checkpoint_dir(run_dir, chosen[0]) / COMMIT).read_text()).get("world_size")
    elif torch.distributed.get_rank() == 0 and committed_steps(run_dir):
        log.warning("%s: no intact checkpoint is left; training starts from step 0", run_dir)
    if torch.distributed.get_world_size() > 1:  # every rank loads the same one
        torch.distributed.broadcast_object_list(chosen, src=0)
    return int(chosen[0]), chosen[1]


def resharded(run_dir: Path, step: int) -> Path:
    """The universal form of checkpoint ``step`` (rank 0 converts it once, under a temporary name renamed into
    place; the other ranks wait at a barrier). Its directory: ``checkpoints/universal``."""
    root = run_dir / run_format.CHECKPOINTS / UNIVERSAL
    tag = tag_of(step)
    if torch.distributed.get_rank() == 0 and not (root / tag).is_dir():
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        tmp = root / f".{tag}.tmp-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        log.info("resharding checkpoint %s for %d ranks (DeepSpeed's ds_to_universal)", tag,
                 torch.distributed.get_world_size())
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(run_format.checkpoint_dir(run_dir, step)), output_folder=str(tmp),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=False))
        os.rename(tmp, root / tag)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
    return root


def load_checkpoint(engine, loader, run_dir: Path, step: int, saved_world: Optional[int]) -> int:
    """Resume from checkpoint ``step`` (``choose_resume``'s), written by ``saved_world`` ranks; returns the
    step (0 when there is none). At another world size it loads the checkpoint's universal form."""
    if not step:
        return 0
    tag = tag_of(step)
    root = run_dir / run_format.CHECKPOINTS
    if saved_world not in (None, torch.distributed.get_world_size()):
        root = resharded(run_dir, step)
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    loader.load_state_dict(client_state["loader"])
    rng_file = run_format.checkpoint_dir(run_dir, step) / f"rng-rank-{torch.distributed.get_rank()}.pt"
    if rng_file.is_file() and saved_world == torch.distributed.get_world_size():  # the draft uses no randomness
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
    final = run_dir / run_format.FINAL
    tmp = run_dir / f".{run_format.FINAL}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    save_file(tensors, str(tmp / run_format.FINAL_WEIGHTS),
              metadata={"format": draft_format.FORMAT, "dtype": "bfloat16"})
    (tmp / run_format.FINAL_ARCH).write_text(json.dumps({**arch_json, "provenance": provenance}, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final
