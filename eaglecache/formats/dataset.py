"""The prepared data set format, ``eaglecache.dataset`` v1 (docs/formats.md section 1): names and reader.

A directory with ``dataset.json`` and ``part-NNNNN.parquet`` files holding rows in ``sample_id``
order. This module owns the format's name and version, its file names, its Arrow schema (the
columns), the row-group limits, and the reader: ``open_dataset`` refuses a missing directory or
an unknown format/version and reads by row groups, so a large set is never loaded into Python
lists. The writer is data/writer.py (``eaglecache data prepare``).
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eaglecache.errors import UserError

DATASET_FORMAT = "eaglecache.dataset"
DATASET_VERSION = 1
METADATA_FILE = "dataset.json"
PART_GLOB = "part-*.parquet"

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


def part_file_name(index: int) -> str:
    """The name of the data set's ``index``-th Parquet file."""
    return f"part-{index:05d}.parquet"


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
        self._files = [pq.ParquetFile(p) for p in sorted(path.glob(PART_GLOB))]
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
