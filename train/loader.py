"""The streaming loader: which samples each rank trains on at each step, read ahead in background threads.

A *feature source* is anything with the reader API of docs/formats.md section 2
(``eaglecache.formats.cache_reader.FeatureCache``, ``InMemoryFeatures`` below, or the
online source in train/online.py): ``.metadata``, ``.sample_ids``,
``.num_tokens(sample_id)`` and ``.read(sample_id) -> Sample``.

The order depends only on (seed, epoch) and the global batch size, never on the
world size: each epoch is a seeded permutation of the samples, cut into global
batches (the incomplete last one is dropped); inside a global batch the samples
are sorted by length (bucketing, so micro-batches pad little) and cut into
micro-batches; micro-batch i goes to rank i % world_size as its accumulation
step i // world_size. So ranks read disjoint samples, and (2 ranks, GA 1) sees
exactly the micro-batches of (1 rank, GA 2).

Each micro-batch is truncated to ``max_seq_length``, shifted for TTT (as the
EAGLE3 trainers do at load time: ``input_ids`` and ``final`` left by one with a zero tail; ``aux`` and
``loss_mask`` not shifted; the last ``loss_mask`` position zeroed) and right-padded
to its longest sample. Worker threads read and decode ahead of the step; the
position (``state_dict``) counts the steps handed to the trainer, so a resumed run
continues with the next one.
"""

from __future__ import annotations

import collections
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from eaglecache.errors import UserError
from eaglecache.train.readahead import ReadAhead


@dataclass
class Batch:
    """One shifted, padded micro-batch."""

    input_ids: torch.Tensor  # int64 [B, T]: the NEXT token at each position (zero tail)
    loss_mask: torch.Tensor  # uint8 [B, T]
    aux: torch.Tensor  # bf16 [B, T, A, H]
    final: torch.Tensor  # bf16 [B, T, H]: the target's pre-norm state one position later (zero tail)
    sample_ids: list[int]
    num_tokens: int  # real (unpadded) tokens

    def to(self, device: torch.device) -> "Batch":
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.loss_mask), move(self.aux), move(self.final),
                     self.sample_ids, self.num_tokens)

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.loss_mask, self.aux, self.final


def shift_sample_tensors(input_ids, loss_mask, aux, final):
    """The load-time TTT shift of [B, T, ...] tensors (dim 1 is time); returns new tensors."""
    ids = torch.zeros_like(input_ids, dtype=torch.int64)
    ids[:, :-1] = input_ids[:, 1:]
    shifted_final = torch.zeros_like(final)
    shifted_final[:, :-1] = final[:, 1:]
    mask = loss_mask.clone()
    mask[:, -1] = 0
    return ids, mask, aux, shifted_final


class InMemoryFeatures:
    """A feature source over samples held in memory (tests, benchmarks, equivalence checks)."""

    thread_safe = True  # reads only: loader threads share it

    def __init__(self, samples: list[Any], metadata: dict[str, Any]):
        self._samples = {int(s.sample_id): s for s in samples}
        self.metadata = metadata
        self.sample_ids = np.array(sorted(self._samples), dtype=np.int64)

    def num_tokens(self, sample_id: int) -> int:
        return len(self._samples[int(sample_id)].input_ids)

    def num_tokens_array(self) -> np.ndarray:
        return np.array([self.num_tokens(s) for s in self.sample_ids], dtype=np.int64)

    def read(self, sample_id: int):
        return self._samples[int(sample_id)]


class SamplePlan:
    """The deterministic assignment of samples to (step, rank, accumulation index)."""

    def __init__(self, sample_ids: np.ndarray, lengths: np.ndarray, *, seed: int, global_batch_size: int,
                 micro_batch_size: int, world_size: int, subset_fraction: float = 1.0):
        if global_batch_size % (micro_batch_size * world_size):
            raise UserError(f"train.global_batch_size {global_batch_size} is not a multiple of "
                            f"micro_batch_size {micro_batch_size} x {world_size} ranks")
        order = np.argsort(sample_ids, kind="stable")
        sample_ids, lengths = np.asarray(sample_ids)[order], np.asarray(lengths)[order]
        if subset_fraction < 1.0:
            keep = max(1, int(round(subset_fraction * len(sample_ids))))
            picked = np.sort(np.random.Generator(np.random.PCG64([seed, 0x5B5E7])).permutation(len(sample_ids))[:keep])
            sample_ids, lengths = sample_ids[picked], lengths[picked]
        self.sample_ids, self.lengths = sample_ids, lengths
        self.seed, self.global_batch_size, self.micro_batch_size = seed, global_batch_size, micro_batch_size
        self.world_size = world_size
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)
        self.steps_per_epoch = len(sample_ids) // global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(sample_ids)} samples are fewer than one global batch of {global_batch_size}")

    def total_steps(self, epochs: float, max_steps: Optional[int] = None) -> int:
        total = max(1, int(epochs * self.steps_per_epoch))
        return min(total, max_steps) if max_steps else total

    def global_batch(self, step: int) -> list[list[int]]:
        """All micro-batches of optimizer step ``step`` (every rank's), as lists of sample ids."""
        epoch, index = divmod(step, self.steps_per_epoch)
        perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.sample_ids))
        picked = perm[index * self.global_batch_size:(index + 1) * self.global_batch_size]
        picked = picked[np.argsort(-self.lengths[picked], kind="stable")]  # bucketing by length
        ids = self.sample_ids[picked].tolist()
        return [ids[i:i + self.micro_batch_size] for i in range(0, len(ids), self.micro_batch_size)]

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches of ``step``, in accumulation order."""
        return self.global_batch(step)[rank::self.world_size]


class StreamingLoader:
    """Iterates ``(step, [Batch] * accumulation_steps)`` for one rank, reading ahead in threads."""

    def __init__(self, source, plan: SamplePlan, *, rank: int, max_seq_length: int, total_steps: int,
                 aux_indices: Optional[list[int]] = None, workers: int = 2, prefetch: int = 4,
                 pin_memory: bool = False):
        self.source, self.plan, self.rank = source, plan, rank
        self.max_seq_length, self.total_steps = max_seq_length, total_steps
        self.aux_indices = aux_indices
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.step = 0  # the next step to hand out
        self._local = threading.local()

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.plan.seed, "global_batch_size": self.plan.global_batch_size,
                "num_samples": len(self.plan.sample_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch_size", "num_samples"):
            if state[key] != self.state_dict()[key]:
                raise UserError(f"cannot resume: the checkpoint's loader had {key}={state[key]}, "
                                f"this run has {self.state_dict()[key]}")
        self.step = int(state["step"])

    # ---------------------------------------------------------------- reading
    def _thread_source(self):
        """Each worker thread gets its own (pickled) copy of a source that is not ``thread_safe``, such as
        the Zarr cache, whose cache of open shards is not; the copy reopens shards itself."""
        if not getattr(self.source, "thread_safe", False):
            if getattr(self._local, "source", None) is None:
                self._local.source = pickle.loads(pickle.dumps(self.source))
            return self._local.source
        return self.source

    def load_micro_batch(self, sample_ids: list[int]) -> Batch:
        source = self._thread_source()
        if getattr(source, "reads_into", False):
            return self._decode_micro_batch(source, sample_ids)
        if hasattr(source, "prefetch"):  # the disk fetches the later samples while the first is decoded
            source.prefetch(sample_ids[1:])
        samples = [source.read(sid) for sid in sample_ids]
        length = min(self.max_seq_length, max(len(s.input_ids) for s in samples))
        ids = torch.zeros(len(samples), length, dtype=torch.int64)
        mask = torch.zeros(len(samples), length, dtype=torch.uint8)
        first = samples[0].aux if self.aux_indices is None else samples[0].aux[:, self.aux_indices]
        aux = torch.zeros(len(samples), length, *first.shape[1:], dtype=first.dtype)
        final = torch.zeros(len(samples), length, samples[0].final.shape[-1], dtype=samples[0].final.dtype)
        num_tokens = 0
        for row, s in enumerate(samples):
            n = min(length, len(s.input_ids))
            num_tokens += n
            ids[row, :n] = torch.from_numpy(np.asarray(s.input_ids[:n], dtype=np.int64))
            mask[row, :n] = torch.from_numpy(np.asarray(s.loss_mask[:n], dtype=np.uint8))
            sample_aux = s.aux[:n] if self.aux_indices is None else s.aux[:n, self.aux_indices]
            aux[row, :n] = sample_aux
            final[row, :n] = s.final[:n]
            if n > 0:
                mask[row, n - 1] = 0  # the last real position has no next-token teacher
        ids, mask, aux, final = shift_sample_tensors(ids, mask, aux, final)
        return self._finish(Batch(ids, mask, aux, final, [int(s) for s in sample_ids], num_tokens))

    def _decode_micro_batch(self, source, sample_ids: list[int]) -> Batch:
        """The same batch as the generic path, with each state decoded once, straight into its place in the
        batch. In a v2 cache (``source.chunk_rows``) whole chunks are decoded into rows that have room for
        them: the zeros stored after a sample are its padding, and ``final`` is a view one row into its
        buffer, which is the TTT shift. Elsewhere rows are decoded into place and the padding zeroed. The
        buffers are allocated pinned when the batch goes to a GPU."""
        lengths = [min(self.max_seq_length, source.num_tokens(sid)) for sid in sample_ids]
        batch_size, length = len(sample_ids), max(lengths)
        num_aux, hidden = len(source.metadata["aux_layer_ids"]), int(source.metadata["hidden_size"])
        chunk = getattr(source, "chunk_rows", None) if self.aux_indices is None else None
        rows = length + 1 if chunk is None else max(length + 1, -(-length // chunk) * chunk)
        empty = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, pin_memory=self.pin_memory)  # noqa: E731
        ids = torch.zeros(batch_size, length, dtype=torch.int64, pin_memory=self.pin_memory)
        mask = torch.zeros(batch_size, length, dtype=torch.uint8, pin_memory=self.pin_memory)
        num_selected = num_aux if self.aux_indices is None else len(self.aux_indices)
        aux_buffer, final_buffer = empty(batch_size, rows, num_selected, hidden), empty(batch_size, rows, hidden)
        aux_bits, final_bits = (t.view(torch.int16).numpy().view(np.uint16) for t in (aux_buffer, final_buffer))
        for row, (sid, n) in enumerate(zip(sample_ids, lengths)):
            if n > 0:
                tokens = np.empty(n, np.int32)
                source.read_rows_into(sid, "input_ids", 0, tokens)
                ids[row, :n - 1] = torch.from_numpy(tokens[1:])
                sample_mask = np.empty(n, np.uint8)
                source.read_rows_into(sid, "loss_mask", 0, sample_mask)
                mask[row, :n - 1] = torch.from_numpy(sample_mask[:n - 1])  # the last real position has no teacher
            if chunk is not None:  # whole chunks in place; final's buffer row t holds the sample's row t
                done = source.read_chunks_into(sid, "aux", n, aux_bits[row])
                source.read_chunks_into(sid, "final", n, final_bits[row])
            else:  # rows in place, final's row t at buffer row t all the same (the view shifts it)
                done = n
                if self.aux_indices is None:
                    source.read_rows_into(sid, "aux", 0, aux_bits[row, :n])
                elif n > 0:
                    every = np.empty((n, num_aux, hidden), np.uint16)
                    source.read_rows_into(sid, "aux", 0, every)
                    aux_bits[row, :n] = every[:, self.aux_indices]
                source.read_rows_into(sid, "final", 0, final_bits[row, :n])
            aux_bits[row, done:] = 0
            final_bits[row, done:] = 0
        aux, final = aux_buffer[:, :length], final_buffer[:, 1:length + 1]  # the shift: position t gets row t + 1
        return self._finish(Batch(ids, mask, aux, final, [int(s) for s in sample_ids], int(sum(lengths))))

    def _finish(self, batch: Batch) -> Batch:
        if self.pin_memory and not batch.aux.is_pinned():
            move = lambda x: x.pin_memory()  # noqa: E731
            batch = Batch(move(batch.input_ids), move(batch.loss_mask), move(batch.aux), move(batch.final),
                          batch.sample_ids, batch.num_tokens)
        return batch

    def _read_ahead_and_load(self, readahead: ReadAhead | None, index: int | None, sample_ids: list[int]) -> Batch:
        if readahead is not None:
            readahead.started(index)
        return self.load_micro_batch(sample_ids)

    def __iter__(self) -> Iterator[tuple[int, list[Batch]]]:
        work = ((step, mb) for step in range(self.step, self.total_steps)
                for mb in self.plan.rank_micro_batches(step, self.rank))
        per_step = self.plan.accumulation_steps
        if self.workers == 0:
            pending = None
        else:
            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="eaglecache-loader")
            pending = collections.deque()
            # the disk stage (train/readahead.py): the kernel fetches what comes next while the workers decode
            readahead = ReadAhead(self.source) if hasattr(self.source, "prefetch") else None
        try:
            batches = []
            while True:
                if pending is None:
                    item = next(work, None)
                    if item is None:
                        return
                    step, batch = item[0], self.load_micro_batch(item[1])
                else:
                    while len(pending) < self.prefetch * per_step:
                        item = next(work, None)
                        if item is None:
                            break
                        index = None if readahead is None else readahead.queued(item[1])
                        pending.append((item[0], pool.submit(self._read_ahead_and_load, readahead, index, item[1])))
                    if not pending:
                        return
                    step, future = pending.popleft()
                    batch = future.result()
                batches.append(batch)
                if len(batches) == per_step:
                    self.step = step + 1
                    yield step, batches
                    batches = []
        finally:
            if pending is not None:
                for _, future in pending:
                    future.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
