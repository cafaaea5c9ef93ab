"""Where extracted hidden states go: a background thread that checks them and feeds the part writer.

The connector runs inside vLLM's worker and must not wait for compression or
the disk, so it only hands each finished request's states to ``StateSink.put``;
the sink's thread waits for the device-to-host copy (CUDA), drops samples with
NaN/Inf (recorded in part.json as skipped), and writes shards through
``PartWriter``. ``put`` blocks only when more than ``max_pending_bytes`` of
states wait, so a slow disk slows the engine instead of filling host memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eaglecache.formats.bits import all_finite
from eaglecache.precompute.writer import PartWriter

log = logging.getLogger(__name__)


@dataclass
class Extracted:
    """One request's states on the host (maybe still being copied there) and what identifies them."""

    sample_id: int
    token_ids: np.ndarray  # int32 [T], the prompt vLLM ran
    loss_mask: np.ndarray  # uint8 [T]
    states: torch.Tensor  # bf16 [T, A + 1, H]: aux layers in ascending order, then layer L
    copied: Any = None  # torch.cuda.Event to wait for before reading ``states``; None on CPU
    nonfinite: torch.Tensor | None = None  # bool scalar computed on the device; None: check here


class StateSink:
    """Owns one part's ``PartWriter`` and the thread that feeds it."""

    def __init__(self, writer: PartWriter, max_pending_bytes: int = 4 << 30):
        self.writer = writer
        self.max_pending_bytes = max_pending_bytes
        self._queue: queue.Queue[Extracted | None] = queue.Queue()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.received: set[int] = set()
        self._shards_before = len(writer.record["shards"])  # a resumed part: count only this run's
        self.stats = {"samples": 0, "tokens": 0, "skipped": 0, "state_bytes": 0, "write_seconds": 0.0}
        self._thread = threading.Thread(target=self._run, name="eaglecache-writer", daemon=True)
        self._thread.start()

    def put(self, item: Extracted) -> None:
        """Queue one request's states (returns at once unless the queue is over its byte budget)."""
        self._raise_if_failed()
        size = item.states.numel() * item.states.element_size()
        with self._cond:
            while self._pending_bytes > 0 and self._pending_bytes + size > self.max_pending_bytes:
                self._cond.wait(timeout=1.0)
                self._raise_if_failed()
            self._pending_bytes += size
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._error is None:
                    self._write(item)
            except BaseException as exc:  # surfaced to the engine side by put/status/close
                if isinstance(exc, OSError):  # disk full, I/O error: the driver turns it into one clear line
                    log.error("writing sample %s failed: %s", item.sample_id, exc)
                else:
                    log.exception("writing sample %s failed", item.sample_id)
                self._error = exc
            finally:
                with self._cond:
                    self._pending_bytes -= item.states.numel() * item.states.element_size()
                    self._cond.notify_all()

    def _write(self, item: Extracted) -> None:
        if item.copied is not None:
            item.copied.synchronize()
        bad = bool(item.nonfinite) if item.nonfinite is not None else not all_finite(item.states)
        started = time.perf_counter()
        if bad:
            self.writer.skip(item.sample_id, "NaN or Inf in hidden states")
            self.stats["skipped"] += 1
            log.warning("sample %d skipped: NaN or Inf in its hidden states", item.sample_id)
        else:
            num_aux = item.states.shape[1] - 1
            self.writer.add(item.sample_id, item.token_ids, item.loss_mask,
                            item.states[:, :num_aux], item.states[:, num_aux])
            self.stats["samples"] += 1
            self.stats["tokens"] += len(item.token_ids)
            self.stats["state_bytes"] += item.states.numel() * item.states.element_size()
        self.stats["write_seconds"] += time.perf_counter() - started
        self.received.add(item.sample_id)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"hidden-state writer failed: {self._error!r}") from self._error

    def status(self) -> dict[str, Any]:
        written = self.writer.record["shards"][self._shards_before:]
        return {"received": len(self.received), "error": repr(self._error) if self._error else None,
                "bytes_written": sum(s["nbytes"] for s in written), **self.stats}

    def close(self, complete: bool) -> dict[str, Any]:
        """Drain the queue, commit the last shard and (when ``complete``) mark the part done."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        started = time.perf_counter()
        record = self.writer.close(complete=complete)
        self.stats["write_seconds"] += time.perf_counter() - started
        return {**self.status(), "num_shards": len(record["shards"]) - self._shards_before,
                "skipped_samples": record["skipped"], "complete": record["complete"]}
