"""The project's KV connector: vLLM's ``extract_hidden_states`` states go straight into the Zarr writer.

vLLM (``speculative_config.method = "extract_hidden_states"``) caches, for every
prompt token, the residual stream after each requested layer in a cache-only
KV layer. This connector, loaded through ``kv_connector_module_path`` with role
``kv_producer``, reads those slots when a request finishes and hands the states
to a ``StateSink`` living in the same worker process: no file per request, no
copy through the engine's output path. Only tensor-parallel rank 0 writes (the
states are full width on every rank).

- CPU: the slots are gathered with one indexing copy, synchronously.
- CUDA: the gather and a NaN/Inf flag run on a side stream, the device-to-host
  copy goes into pinned memory asynchronously, and the request's blocks are
  released only once that copy's event has completed.

Which cache and part the states go to is set per run by the driver through
``collective_rpc`` (``WriterRPC`` below, installed as vLLM's
``worker_extension_cls``), so one engine can serve several runs.
The request carries its ``sample_id`` and loss mask in ``kv_transfer_params``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector, extract_from_kv_cache,
)

from eaglecache.precompute.sink import Extracted, StateSink
from eaglecache.precompute.writer import PartWriter

log = logging.getLogger(__name__)


def as_stored(states: torch.Tensor) -> torch.Tensor:
    """The states as the cache stores them, bf16: the hidden-state layer's slots have the target's compute
    dtype, float32 where bf16 would be slow (eaglecache/dtypes.py). Rounded to nearest even, as online
    training's features are; a value beyond bf16's range becomes Inf and the sample is skipped."""
    return states if states.dtype == torch.bfloat16 else states.to(torch.bfloat16)

CONNECTOR_NAME = "HiddenStatesWriterConnector"
MODULE_PATH = __name__


@dataclass
class PendingSave:
    req_id: str
    sample_id: int
    token_ids: np.ndarray  # int32
    loss_mask: bytes  # uint8 per token
    block_ids: list[int]


@dataclass
class WriterConnectorMetadata(KVConnectorMetadata):
    pending_saves: list[PendingSave] = field(default_factory=list)


class HiddenStatesWriterConnector(ExampleHiddenStatesConnector):
    """Store-only connector; reuses vLLM's example for cache-group lookup, layer registration and
    the scheduler-side no-op hooks, and replaces its per-request safetensors files by the sink."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.use_lock = False  # the example's per-file locks: there are no files here
        self._scheduled: set[str] = set()
        self._pending: dict[str, PendingSave] = {}
        self.sink: StateSink | None = None
        self._in_flight: dict[str, Any] = {}  # req_id -> CUDA event of its device-to-host copy

    # ------------------------------------------------------------ scheduler side

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = WriterConnectorMetadata(pending_saves=list(self._pending.values()))
        self._pending.clear()
        self._scheduled.update(req.req_id for req in scheduler_output.scheduled_new_reqs)
        return meta

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the request's blocks until the worker has read its states; requests without a
        sample_id (not ours) and requests never scheduled have nothing to save."""
        params = request.kv_transfer_params or {}
        scheduled = request.request_id in self._scheduled
        self._scheduled.discard(request.request_id)
        if not scheduled or "sample_id" not in params or request.prompt_token_ids is None:
            return False, None
        self._pending[request.request_id] = PendingSave(
            req_id=request.request_id, sample_id=int(params["sample_id"]),
            token_ids=np.asarray(request.prompt_token_ids, dtype=np.int32),
            loss_mask=bytes(params["loss_mask"]), block_ids=list(block_ids),
        )
        return True, None

    # ------------------------------------------------------------ worker side

    def wait_for_save(self) -> None:
        pass  # nothing is written during the forward pass

    def _slots(self, block_ids: list[int]) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        return (blocks[:, None] * self._block_size + offsets[None, :]).flatten()

    def _extract(self, pending: PendingSave) -> Extracted:
        num_tokens = len(pending.token_ids)
        slots = self._slots(pending.block_ids)
        item = Extracted(sample_id=pending.sample_id, token_ids=pending.token_ids,
                         loss_mask=np.frombuffer(pending.loss_mask, dtype=np.uint8), states=None)
        if not self._kv_cache.is_cuda:
            item.states = as_stored(extract_from_kv_cache(self._kv_cache, slots, num_tokens))  # indexing copies
            return item
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        stream = self._get_copy_stream()
        stream.wait_stream(torch.cuda.current_stream())  # the forward pass that filled the slots
        with torch.cuda.stream(stream):
            with gpu_sync_allowed():
                slots_gpu = slots.pin_memory().to(self._kv_cache.device, non_blocking=True)
            states_gpu = as_stored(extract_from_kv_cache(self._kv_cache, slots_gpu, num_tokens))
            nonfinite_gpu = (~torch.isfinite(states_gpu)).any()
            item.states = torch.empty(states_gpu.shape, dtype=states_gpu.dtype, pin_memory=True)
            item.states.copy_(states_gpu, non_blocking=True)
            item.nonfinite = torch.empty((), dtype=torch.bool, pin_memory=True)
            item.nonfinite.copy_(nonfinite_gpu, non_blocking=True)
        item.copied = torch.cuda.Event()
        item.copied.record(stream)
        return item

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Hand finished requests' states to the sink; report a request done (its blocks may be
        reused) once its states are off the device."""
        done: set[str] = set()
        metadata = self._get_connector_metadata() if self.has_connector_metadata() else None
        if isinstance(metadata, WriterConnectorMetadata) and self._is_tp_rank_zero:
            for pending in metadata.pending_saves:
                if self.sink is None:
                    raise RuntimeError("hidden states arrived but no cache part is open (WriterRPC.open)")
                item = self._extract(pending)
                self.sink.put(item)
                if item.copied is None:
                    done.add(pending.req_id)
                else:
                    self._in_flight[pending.req_id] = item.copied
        for req_id, event in list(self._in_flight.items()):
            if event.query():
                done.add(req_id)
                del self._in_flight[req_id]
        return done or None, None

    def shutdown(self) -> None:
        """Engine teardown with a part still open: commit what arrived, leave the part unfinished."""
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.close(complete=False)
            except Exception as exc:  # the writer's own failure again, already reported
                log.error("closing the cache part at shutdown failed: %s", str(exc).splitlines()[0][:300])
        super().shutdown()


def _connector() -> HiddenStatesWriterConnector | None:
    """This worker's connector when it is the writing one (TP rank 0), else None."""
    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    if not isinstance(connector, HiddenStatesWriterConnector) or not connector._is_tp_rank_zero:
        return None
    return connector


class WriterRPC:
    """Methods added to vLLM's worker (``worker_extension_cls``), called with ``LLM.collective_rpc``.
    Each returns None on workers that do not write."""

    def eaglecache_open_part(self, cache_dir: str, part_index: int, num_parts: int, metadata: dict,
                             sample_range: list[int], max_pending_bytes: int) -> dict | None:
        connector = _connector()
        if connector is None:
            return None
        if connector.sink is not None:
            raise RuntimeError("a cache part is already open in this engine")
        writer = PartWriter(cache_dir, part_index, num_parts, metadata, tuple(sample_range))
        connector.sink = StateSink(writer, max_pending_bytes=max_pending_bytes)
        return {"committed": sorted(writer.committed), "complete": writer.complete}

    def eaglecache_part_status(self) -> dict | None:
        connector = _connector()
        return connector.sink.status() if connector is not None and connector.sink is not None else None

    def eaglecache_close_part(self, complete: bool) -> dict | None:
        connector = _connector()
        if connector is None or connector.sink is None:
            return None
        sink, connector.sink = connector.sink, None
        return sink.close(complete)
