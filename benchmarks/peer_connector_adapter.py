"""Adapter: the peers' hidden-state connectors with a synchronous CPU write, for `vllm serve` on CPU.

speculators' offline path runs `vllm serve` with vLLM's ``ExampleHiddenStatesConnector`` (lossless,
the target's compute dtype) or hs-connectors' ``FP8HiddenStatesConnector`` (FP8 e4m3, a float32
scale per token). Both extract a finished request's states on a CUDA side stream and record a CUDA
event before a thread writes the file; neither runs on a CPU build of vLLM. The subclasses here
replace only that step (``_submit_async_write``): the same slot gather, the same
``_write_tensors`` (so the FP8 subclass keeps the peer's own quantization and file layout), run
synchronously in the worker. Everything else (scheduler bookkeeping, per-file locks, the returned
``hidden_states_path``) is the peers' code.

`vllm serve` loads them with ``PYTHONPATH=benchmarks`` and
``"kv_connector_module_path": "peer_connector_adapter"``; benchmarks/peer_generation.py does that.
"""

from __future__ import annotations

import fcntl
import os

import torch
from hs_connectors.fp8_hidden_states_connector import FP8HiddenStatesConnector
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector, extract_from_kv_cache,
)


class _CopiedEvent:
    """Stands for the peers' CUDA copy event: on CPU the copy is done when the gather returns."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _SynchronousCPUWrite:
    """The peers' ``_submit_async_write`` without CUDA streams: gather, then write, in this thread."""

    def _submit_async_write(self, pending) -> None:
        if not self._is_tp_rank_zero:
            return
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (blocks[:, None] * self._block_size + offsets[None, :]).flatten()
        states = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0])
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:  # as the peer does when wait_for_save made none
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        copied = _CopiedEvent()
        self._write_tensors({"hidden_states": states, "token_ids": pending.token_ids.clone()}, copied,
                            pending.filename, lock_fd)
        self._req_copy_events[pending.req_id] = copied  # get_finished reports the request done


class CPUExampleHiddenStatesConnectorAdapter(_SynchronousCPUWrite, ExampleHiddenStatesConnector):
    """vLLM's ``ExampleHiddenStatesConnector`` (speculators' lossless path), synchronous on CPU."""


class CPUFP8HiddenStatesConnectorAdapter(_SynchronousCPUWrite, FP8HiddenStatesConnector):
    """hs-connectors' ``FP8HiddenStatesConnector`` (speculators' FP8 path), synchronous on CPU."""
