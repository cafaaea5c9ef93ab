"""The feature cache writer (``eaglecache.cache`` v2, eaglecache/formats/cache.py): shards and part manifests.

A cache is one ``cache.json`` (format, version, metadata) and parts written by
independent jobs; each part has a ``part.json`` listing the shards it has
committed. A shard is a Zarr v3 group of whole samples, written once under a
temporary name and renamed into place; only then is it recorded (with
checksums of every array taken at write time) in ``part.json``, which is
itself replaced atomically. So a crashed job leaves only a temporary directory
behind, which the next run of the same part removes, and a shard that is in the
manifest is complete. The layout is eaglecache/formats/cache.py, documented in
docs/formats.md section 2.

Bits are kept exactly: bf16 states are stored as their uint16 bits (zarr has no
bfloat16). Every array uses zarr's sharding codec with one shard per array
(one file) and inner chunks of ``chunk_tokens`` tokens, so a read touches only
the chunks of the sample it wants; in a compressed cache each sample starts a chunk (format v2),
so those chunks hold no other sample's tokens. A shard's metadata documents are zarr's own,
made once per layout (eaglecache/formats/shard_meta.py); uncompressed arrays' files are
written straight from the buffer (precompute/shardfile.py), compressed ones by
zarr(s). Reading is eaglecache/formats/cache_reader.py.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from eaglecache.errors import UserError
from eaglecache.formats.cache import (
    CACHE_FILE, FORMAT, PART_FILE, STATE_ARRAYS, VERSION, cache_document, fingerprint, is_aligned, is_fp8,
    new_part_record, parse_part_json, part_dir, read_cache_json, sample_starts, shard_name, shard_number,
)
from eaglecache.formats.bits import bf16_bits, checksum, crc32c_extend, crc32c_label, quantize_fp8
from eaglecache.precompute.shardfile import aligned_empty, direct_write_supported, write_plain_chunk, write_shard_file
from eaglecache.formats.shard_meta import shard_documents, use_fast_codec_pipeline, write_documents

def write_json_atomic(path: Path, obj: Any, compact: bool = False) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, sort_keys=True, **({"separators": (",", ":")} if compact else {"indent": 1})) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- writing


def write_shard(path: Path, arrays: dict[str, np.ndarray], sample_ids: list[int], lengths: list[int], *,
                codec: str, codec_level: int, chunk_tokens: int, fp8: bool,
                checksums: dict[str, str] | None = None) -> dict[str, Any]:
    """Write one shard of whole samples ONCE under a temporary name, then rename it to ``path``.

    ``arrays`` holds the samples' rows: ``input_ids`` int32 [R], ``loss_mask`` uint8 [R],
    ``aux`` uint16 [R, A, H] and ``final`` uint16 [R, H] (bf16 bits); sample i is ``lengths[i]``
    rows from row ``sample_starts(lengths, chunk_tokens, is_aligned(VERSION, ...))[0][i]``, zeros
    between samples (``ShardBuffer`` lays them out so).
    ``checksums`` may already hold those arrays' checksums (taken as they were filled).
    Returns the record that goes into part.json.
    """
    arrays = dict(arrays)
    checksums = {} if fp8 else dict(checksums or {})  # fp8: those of the arrays as stored, taken below
    if fp8:
        for name in STATE_ARRAYS:
            arrays[name], arrays[f"{name}_scale"] = quantize_fp8(arrays[name])
    num_tokens = int(sum(lengths))
    aligned = is_aligned(VERSION, {"codec": codec})
    starts, num_rows = sample_starts(lengths, chunk_tokens, aligned)
    if len(arrays["input_ids"]) != num_rows:
        raise ValueError(f"shard arrays have {len(arrays['input_ids'])} rows, the layout {num_rows}")
    arrays["offsets"] = np.concatenate([starts, [num_rows]]).astype(np.int64)
    arrays["sample_ids"] = np.asarray(sample_ids, dtype=np.int64)
    if aligned:
        arrays["num_tokens"] = np.asarray(lengths, dtype=np.int64)

    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    per_token = {name for name in arrays if name not in ("offsets", "sample_ids", "num_tokens")}
    docs = shard_documents(arrays, per_token, chunk_tokens=chunk_tokens, codec=codec, codec_level=codec_level,
                           attributes={"format": FORMAT, "version": VERSION, "fp8": fp8})
    write_documents(tmp, docs)
    for name, data in arrays.items():
        doc = docs[f"{name}/zarr.json"]
        if direct_write_supported(doc, data):
            write_shard_file(doc, tmp / name, data)
        elif not write_plain_chunk(doc, tmp / name, data):
            zarr.open_array(tmp / name, mode="r+")[...] = data  # compressed: zarr(s) encodes it
    checksums.update({name: checksum(data) for name, data in arrays.items() if name not in checksums})
    _fsync_tree(tmp)  # on disk before it is named: a listed shard survives a power loss too
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    return {
        "name": path.name,
        "num_samples": len(sample_ids),
        "num_tokens": num_tokens,
        **({"num_rows": num_rows} if aligned else {}),
        "sample_ids": [int(x) for x in sample_ids],
        "sample_num_tokens": [int(x) for x in lengths],
        "checksums": checksums,
        "shapes": {name: list(data.shape) for name, data in arrays.items()},
        "nbytes": _dir_size(path),
    }


class ShardBuffer:
    """The per-token arrays of the shard being filled, allocated once and reused for every shard:
    fresh memory costs a page fault per 4 KiB, which on a busy host is slower than the disk."""

    def __init__(self, num_aux: int, hidden_size: int, capacity: int, chunk_tokens: int = 1, aligned: bool = False):
        self.chunk_tokens, self.aligned = chunk_tokens, aligned
        self.layout = {"input_ids": ((), np.int32), "loss_mask": ((), np.uint8),
                       "aux": ((num_aux, hidden_size), np.uint16), "final": ((hidden_size,), np.uint16)}
        self.capacity = 0
        self.arrays: dict[str, np.ndarray] = {}
        self._grow(capacity)
        self.clear()

    def _grow(self, capacity: int) -> None:
        old, self.arrays = self.arrays, {}
        for name, (tail, dtype) in self.layout.items():
            self.arrays[name] = aligned_empty((capacity,) + tail, dtype)  # O_DIRECT writes it as it is
            if old:
                self.arrays[name][: self.num_rows] = old[name][: self.num_rows]
        self.capacity = capacity

    def clear(self) -> None:
        self.sample_ids: list[int] = []
        self.lengths: list[int] = []
        self.num_rows = 0
        self.crcs = dict.fromkeys(self.layout, 0)

    def append(self, sample_id: int, arrays: dict[str, np.ndarray]) -> None:
        start = self.num_rows  # tokens so far and the padding between samples
        if self.aligned and start % self.chunk_tokens:
            start += self.chunk_tokens - start % self.chunk_tokens
        stop = start + len(arrays["input_ids"])
        if stop > self.capacity:  # one sample longer than a shard: that shard is just larger
            self._grow(max(stop, int(self.capacity * 1.25)))
        for name in arrays:
            if start > self.num_rows:  # the padding rows are part of the array and of its checksum
                self.arrays[name][self.num_rows:start] = 0
                self.crcs[name] = crc32c_extend(self.arrays[name][self.num_rows:start], self.crcs[name])
        for name, data in arrays.items():
            self.arrays[name][start:stop] = data
            # here rather than at commit: the filling thread is otherwise idle while the disk is busy
            self.crcs[name] = crc32c_extend(self.arrays[name][start:stop], self.crcs[name])
        self.sample_ids.append(int(sample_id))
        self.lengths.append(stop - start)
        self.num_rows = stop

    def filled(self) -> dict[str, np.ndarray]:
        return {name: data[: self.num_rows] for name, data in self.arrays.items()}

    def checksums(self) -> dict[str, str]:
        return {name: crc32c_label(crc) for name, crc in self.crcs.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*"), reverse=True):  # files before the directories holding them
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(path)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class PartWriter:
    """Buffers samples and commits them as shards of about ``shard_tokens`` tokens into one part.

    One job owns one part (``part-IIIII-of-NNNNN``); nothing else writes into it.
    Opening an existing part resumes it: shards already in part.json stay, leftover
    temporary directories of a crashed run are removed, and ``committed`` lists the
    samples that need not be computed again.

    A full shard is committed (encoded, written, fsynced, recorded) by a background thread
    while ``add`` fills a second buffer, so the disk and the copies into the buffer overlap;
    at most one shard is in flight, so host memory holds two shard buffers. An error of the
    commit is raised by the next ``add``, ``flush`` or ``close``.
    """

    def __init__(self, cache_dir: str | Path, part_index: int, num_parts: int, metadata: dict[str, Any],
                 sample_range: tuple[int, int] | None = None):
        use_fast_codec_pipeline()
        self.dir = part_dir(cache_dir, part_index, num_parts)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.fp8 = is_fp8(metadata)
        self.num_aux = len(metadata["aux_layer_ids"])
        self.hidden_size = metadata["hidden_size"]
        for leftover in self.dir.glob("*.tmp-*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        path = self.dir / PART_FILE
        if path.exists():
            self.record = parse_part_json(path, path.read_text())
            if self.record.get("cache_fingerprint") != fingerprint(metadata):
                raise UserError(f"{self.dir}: written with other settings than {CACHE_FILE}; remove it to redo it")
            if self.record["version"] != VERSION and not self.record["complete"]:  # its shards' layout is not ours
                raise UserError(f"{self.dir}: an unfinished part of a format v{self.record['version']} cache; finish "
                                f"it with the release that began it, or convert the cache (eaglecache cache convert)")
        else:
            self.record = new_part_record(part_index, num_parts, metadata, sample_range)
        self.committed = {sid for shard in self.record["shards"] for sid in shard["sample_ids"]}
        self._record_lock = threading.Lock()  # the committer and ``skip`` both change the record
        self.version = VERSION
        self.aligned = is_aligned(self.version, metadata)
        self._buffers = [self._new_buffer()]
        self._buffer = self._buffers[0]
        self._committer: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    def _new_buffer(self) -> ShardBuffer:
        return ShardBuffer(self.num_aux, self.hidden_size, self.metadata["shard_tokens"],
                           self.metadata["chunk_tokens"], self.aligned)

    @property
    def complete(self) -> bool:
        return bool(self.record["complete"])

    def add(self, sample_id: int, input_ids, loss_mask, aux, final) -> None:
        """Queue one sample (aux bf16 [T, A, H], final bf16 [T, H]); commits a shard when one is full."""
        arrays = {"input_ids": np.asarray(input_ids, dtype=np.int32), "loss_mask": np.asarray(loss_mask, dtype=np.uint8),
                  "aux": bf16_bits(aux), "final": bf16_bits(final)}
        num_tokens = len(arrays["input_ids"])
        expected = {"loss_mask": (num_tokens,), "aux": (num_tokens, self.num_aux, self.hidden_size),
                    "final": (num_tokens, self.hidden_size)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"sample {sample_id}: {name} has shape {arrays[name].shape}, expected {shape}")
        if self._buffer.num_rows and self._buffer.num_rows + num_tokens > self.metadata["shard_tokens"]:
            self._submit()
        self._buffer.append(sample_id, arrays)

    def skip(self, sample_id: int, reason: str) -> None:
        """Record a sample that is not stored (e.g. NaN/Inf states); saved with the next commit."""
        with self._record_lock:
            self.record["skipped"].append({"sample_id": int(sample_id), "reason": reason})

    def flush(self) -> None:
        """Commit everything buffered and wait until it is in part.json."""
        self._submit()
        self._wait()
        with self._record_lock:
            self._save()  # also records samples skipped since the last commit

    def close(self, complete: bool = True) -> dict[str, Any]:
        """Commit what is buffered; mark the part complete (all its samples done) unless told otherwise."""
        try:
            self._submit()
            self._wait()
        finally:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
                self._committer = None
        with self._record_lock:
            self.record["complete"] = complete
            self._save()
        return self.record

    def _submit(self) -> None:
        """Hand the filled buffer to the committer and go on filling the other one."""
        self._wait()  # one shard in flight: its buffer is the one we are about to reuse
        if not self._buffer.num_rows:
            return
        filled = self._buffer
        if len(self._buffers) == 1:
            self._buffers.append(self._new_buffer())
        self._buffer = self._buffers[1] if filled is self._buffers[0] else self._buffers[0]
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-commit")
        self._in_flight = self._committer.submit(self._commit, filled)

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()  # the committer's error, if any, is raised here

    def _commit(self, buffer: ShardBuffer) -> None:
        # after `cache verify --repair` dropped a shard, its name may be reused only once it is gone
        index = 1 + max((shard_number(s["name"]) for s in self.record["shards"]), default=-1)
        shard = write_shard(self.dir / shard_name(index), buffer.filled(), buffer.sample_ids, buffer.lengths,
                            codec=self.metadata["codec"], codec_level=self.metadata["codec_level"],
                            chunk_tokens=self.metadata["chunk_tokens"], fp8=self.fp8,
                            checksums=buffer.checksums())
        with self._record_lock:
            self.record["shards"].append(shard)
            self.committed.update(buffer.sample_ids)
            self._save()
        buffer.clear()

    def _save(self) -> None:
        write_json_atomic(self.dir / PART_FILE, self.record, compact=True)  # long id lists


def create_or_check_cache(cache_dir: str | Path, metadata: dict[str, Any]) -> Path:
    """Write cache.json for a new cache, or check that an existing one was made with the same settings.

    Independent jobs of one cache all call this with identical metadata, so the
    race between them is harmless (the same bytes are renamed into place).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / CACHE_FILE
    if path.exists():
        doc = read_cache_json(path)
        if doc["version"] != VERSION:
            raise UserError(f"{cache_dir} is a format v{doc['version']} cache; this release writes v{VERSION}: "
                            f"finish it with the release that began it, or convert it first (eaglecache cache "
                            f"convert --cache {cache_dir} --output NEW)")
        existing = doc["metadata"]
        if existing != metadata:
            keys = sorted(k for k in set(existing) | set(metadata) if existing.get(k) != metadata.get(k))
            raise UserError(f"{cache_dir} holds a cache made with other settings (differs in: {', '.join(keys)}); "
                            "use another --output or remove it")
    else:
        write_json_atomic(path, cache_document(metadata))
    return path
