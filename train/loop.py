"""The training loop: one optimizer step per global batch, logs and checkpoints at their intervals.

Reads top to bottom: wait for this rank's micro-batches, run forward / backward /
step on each (DeepSpeed accumulates and steps the optimizer on the last), log,
checkpoint. Everything else (what a batch is, the loss, the engine) is elsewhere.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eaglecache.train.checkpoint import save_checkpoint
from eaglecache.train.metrics import MetricsTracker, MetricsWriter

log = logging.getLogger(__name__)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def run_loop(engine, loader, *, run_dir: Path, train, start_step: int, total_steps: int,
             device: torch.device, rank: int, world_size: int) -> dict[str, Any]:
    """Train from ``start_step`` to ``total_steps``; returns the last logged record (all ranks)."""
    is_main = rank == 0
    tracker = MetricsTracker(train.ttt_length, device)
    writer = MetricsWriter(run_dir, start_step) if is_main else None
    bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not is_main, dynamic_ncols=True)
    engine.train()
    last: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        wait_from = time.perf_counter()
        for step, micro_batches in loader:
            compute_from = time.perf_counter()
            for batch in micro_batches:
                batch = batch.to(device)
                loss, stats = engine(*batch.model_inputs())
                engine.backward(loss)
                engine.step()
                tracker.add_micro_batch(loss, stats, batch.num_tokens)
            done = time.perf_counter()
            tracker.add_step_time(compute_from - wait_from, done - wait_from)
            finished = step + 1
            if finished % train.log_interval == 0 or finished == total_steps:
                last = tracker.reduce(world_size)
                last.update(step=finished, lr=float(engine.get_lr()[0]), grad_norm=_grad_norm(engine))
                if is_main:
                    writer.write(finished, {k: v for k, v in last.items() if k != "step"})
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last['acc_0']:.3f}",
                                    accept3=f"{last['accept_len_3']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if finished % train.checkpoint_interval == 0 or finished == total_steps:
                save_checkpoint(engine, loader, run_dir, finished, train.keep_checkpoints)
            bar.update(1)
            wait_from = time.perf_counter()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    last["wall_s"] = time.perf_counter() - started
    return last
