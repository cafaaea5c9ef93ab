"""The prepared data set on disk: ``eaglecache.dataset`` v1 (docs/formats.md section 1).

A directory with ``dataset.json`` and ``part-NNNNN.parquet`` files holding rows in
``sample_id`` order. ``write_dataset`` streams rows into it atomically (a temp
directory beside the target, renamed into place); ``open_dataset`` reads it by
row groups, so a large set is never loaded into Python lists.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eaglecache.errors import UserError

DATASET_FORMAT = "eaglecache.dataset"
DATASET_VERSION = 1
METADATA_FILE = "dataset.json"

SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.uint8())),
    ("num_tokens", pa.int32()),
    ("num_loss_tokens", pa.int32()),
    ("source", pa.string()),
    ("record_index", pa.int64()),
    ("content_hash", pa.string()),
])

# A row group is the unit of reading (``sample`` decodes one whole group), so it is bounded in rows
# and in tokens: 256 short samples, or fewer long ones (four 32k-token samples at most).
ROWS_PER_GROUP = 256
TOKENS_PER_GROUP = 1 << 17
ROWS_PER_PART = 65536     # a new part file starts once the current one holds this many rows


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _batch(rows: list[dict], first_id: int) -> pa.RecordBatch:
    ids = [np.asarray(r["input_ids"], dtype=np.int32) for r in rows]
    masks = [np.asarray(r["loss_mask"], dtype=np.uint8) for r in rows]
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    for r, a, m in zip(rows, ids, masks):
        if len(a) != len(m):
            raise ValueError(f"record {r.get('record_index')}: input_ids and loss_mask differ in length")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.RecordBatch.from_arrays([
        pa.array(np.arange(first_id, first_id + len(rows), dtype=np.int64)),
        pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(ids) if ids else [], pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(masks) if masks else [], pa.uint8())),
        pa.array(lengths.astype(np.int32)),
        pa.array(np.array([int(m.sum()) for m in masks], dtype=np.int32)),
        pa.array([str(r["source"]) for r in rows], pa.string()),
        pa.array([int(r["record_index"]) for r in rows], pa.int64()),
        pa.array([str(r["content_hash"]) for r in rows], pa.string()),
    ], schema=SCHEMA)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dataset(out_dir: str | Path, rows: Iterable[dict],
                  metadata: dict[str, Any] | Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Write rows (dicts with input_ids, loss_mask, source, record_index, content_hash) as a data set.

    ``sample_id`` is assigned densely in iteration order. ``metadata`` (tokenizer_hash,
    chat_template_hash, target_path, config, inputs, report, ...) is stored in dataset.json
    with format, version, num_samples, num_tokens, num_loss_tokens and dataset_hash added; it may
    be a function, called once the rows are exhausted, so counts gathered while they stream fit in.
    Nothing appears at ``out_dir`` unless the whole write succeeds. Returns the metadata.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    digest = hashlib.sha256()
    num_samples = num_tokens = num_loss_tokens = 0
    writer: pq.ParquetWriter | None = None
    num_parts = rows_in_part = pending_tokens = 0
    pending: list[dict] = []

    def flush() -> None:
        nonlocal writer, num_parts, rows_in_part, pending_tokens, num_samples, num_tokens, num_loss_tokens
        if not pending:
            return
        if writer is None or rows_in_part >= ROWS_PER_PART:
            if writer is not None:
                writer.close()
            writer = pq.ParquetWriter(tmp / _part_name(num_parts), SCHEMA, compression="zstd")
            num_parts += 1
            rows_in_part = 0
        batch = _batch(pending, num_samples)
        for r in pending:
            digest.update(str(r["content_hash"]).encode())
            digest.update(np.asarray(r["input_ids"], dtype="<i4").tobytes())
        writer.write_batch(batch, row_group_size=ROWS_PER_GROUP)
        rows_in_part += batch.num_rows
        pending_tokens = 0
        num_samples += batch.num_rows
        num_tokens += int(batch.column("num_tokens").to_numpy().sum())
        num_loss_tokens += int(batch.column("num_loss_tokens").to_numpy().sum())
        pending.clear()

    try:
        for row in rows:
            pending.append(row)
            pending_tokens += len(row["input_ids"])
            if len(pending) == ROWS_PER_GROUP or pending_tokens >= TOKENS_PER_GROUP:
                flush()
        flush()
        if writer is not None:
            writer.close()
        extra = metadata() if callable(metadata) else metadata
        meta = {"format": DATASET_FORMAT, "version": DATASET_VERSION, **extra,
                "num_samples": num_samples, "num_tokens": num_tokens, "num_loss_tokens": num_loss_tokens,
                "num_parts": num_parts, "dataset_hash": digest.hexdigest()}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _lists_to_numpy(column: pa.ChunkedArray | pa.Array, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column, without Python objects per row."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values, offsets


class Dataset:
    """Read-only view of a prepared data set; samples are read by row group and cached one group at a time."""

    def __init__(self, path: Path, metadata: dict[str, Any]):
        self.path = path
        self.metadata = metadata
        self._files = [pq.ParquetFile(p) for p in sorted(path.glob("part-*.parquet"))]
        # Global index of row groups: (file, group) in sample_id order and the first sample of each.
        self._groups: list[tuple[int, int]] = []
        self._group_starts: list[int] = []
        start = 0
        for fi, f in enumerate(self._files):
            for gi in range(f.num_row_groups):
                self._groups.append((fi, gi))
                self._group_starts.append(start)
                start += f.metadata.row_group(gi).num_rows
        self._len = start
        if self._len != metadata.get("num_samples"):
            raise UserError(f"{path}: {self._len} rows in Parquet parts but dataset.json says "
                            f"{metadata.get('num_samples')} (incomplete or altered data set)")
        self._cache: tuple[int, list[dict]] = (-1, [])  # (row group, its samples): one object, so a
        # reader thread never pairs one group's index with another group's rows

    def __len__(self) -> int:
        return self._len

    def _read_group(self, g: int) -> list[dict]:
        fi, gi = self._groups[g]
        table = self._files[fi].read_row_group(gi)
        ids, id_off = _lists_to_numpy(table.column("input_ids"), np.int32)
        mask, mask_off = _lists_to_numpy(table.column("loss_mask"), np.uint8)
        sample_ids = table.column("sample_id").to_numpy()
        num_loss = table.column("num_loss_tokens").to_numpy()
        sources = table.column("source").to_pylist()
        record_index = table.column("record_index").to_numpy()
        hashes = table.column("content_hash").to_pylist()
        return [
            {"sample_id": int(sample_ids[i]),
             "input_ids": ids[id_off[i]:id_off[i + 1]],
             "loss_mask": mask[mask_off[i]:mask_off[i + 1]],
             "num_tokens": int(id_off[i + 1] - id_off[i]),
             "num_loss_tokens": int(num_loss[i]),
             "source": sources[i], "record_index": int(record_index[i]), "content_hash": hashes[i]}
            for i in range(table.num_rows)
        ]

    def sample(self, sample_id: int) -> dict:
        """One sample: input_ids int32[T], loss_mask uint8[T] and its provenance fields."""
        if not 0 <= sample_id < self._len:
            raise IndexError(f"sample_id {sample_id} out of range 0..{self._len - 1}")
        g = bisect.bisect_right(self._group_starts, sample_id) - 1
        cache = self._cache
        if cache[0] != g:
            cache = self._cache = (g, self._read_group(g))
        return cache[1][sample_id - self._group_starts[g]]

    def iter_samples(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Samples start..stop-1 in sample_id order, streamed one row group at a time."""
        stop = self._len if stop is None else min(stop, self._len)
        if start >= stop:
            return
        g = bisect.bisect_right(self._group_starts, start) - 1
        while g < len(self._groups) and self._group_starts[g] < stop:
            for s in self._read_group(g):
                if start <= s["sample_id"] < stop:
                    yield s
            g += 1

    def num_tokens_array(self) -> np.ndarray:
        """Token count of every sample (int64[N]), reading only the num_tokens column."""
        if not self._files:
            return np.zeros(0, dtype=np.int64)
        parts = [f.read(columns=["num_tokens"]).column(0).to_numpy() for f in self._files]
        return np.concatenate(parts).astype(np.int64)

    def iter_loss_tokens(self) -> Iterator[np.ndarray]:
        """Per row group, the loss-masked token ids concatenated (for vocab counting)."""
        for fi, f in enumerate(self._files):
            for gi in range(f.num_row_groups):
                table = f.read_row_group(gi, columns=["input_ids", "loss_mask"])
                ids, _ = _lists_to_numpy(table.column("input_ids"), np.int32)
                mask, _ = _lists_to_numpy(table.column("loss_mask"), np.uint8)
                yield ids[mask.astype(bool)]


def open_dataset(path: str | Path) -> Dataset:
    """Open a prepared data set; refuses a missing directory or an unknown format/version."""
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise UserError(f"{path}: not a prepared data set (no {METADATA_FILE})")
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc.__class__.__name__})") from None
    if metadata.get("format") != DATASET_FORMAT or metadata.get("version") != DATASET_VERSION:
        raise UserError(f"{path}: format {metadata.get('format')!r} version {metadata.get('version')!r} "
                        f"is not {DATASET_FORMAT!r} version {DATASET_VERSION}")
    return Dataset(path, metadata)
