"""The prepared data set writer: rows streamed into ``eaglecache.dataset`` v1 (docs/formats.md section 1).

``write_dataset`` streams rows into a data set directory atomically (a temp directory beside the
target, renamed into place). The format itself (names, version, columns, row-group limits) and its
reader are eaglecache/formats/dataset.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eaglecache.formats.dataset import (
    DATASET_FORMAT, DATASET_VERSION, METADATA_FILE, ROWS_PER_GROUP, ROWS_PER_PART, SCHEMA, TOKENS_PER_GROUP,
    part_file_name,
)


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
            writer = pq.ParquetWriter(tmp / part_file_name(num_parts), SCHEMA, compression="zstd")
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
