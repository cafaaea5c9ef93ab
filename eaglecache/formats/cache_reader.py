"""Reading the feature cache (``eaglecache.cache`` v1 and v2): ``open_cache`` and the read-only ``FeatureCache``.

The layout is eaglecache/formats/cache.py and the writer precompute/writer.py; this module only reads:
opening checks the format version and the parts, builds the sample index from
the part manifests (no array data), and ``read(sample_id)`` reads just the
bytes of that sample's chunks, straight from the shard files (eaglecache/formats/shard_reader.py;
zarr itself for a layout that module does not decode).

A cache is read from a local (or shared) filesystem path, or from any URL fsspec
opens, e.g. ``s3://bucket/prefix`` (needs ``s3fs``): the part manifests through
fsspec, the shards by ranged reads through fsspec. S3 credentials and endpoint
come from the standard AWS settings (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_PROFILE``, ~/.aws/config).

Transient store errors do not end a days-long training run: an S3 filesystem is made with
botocore's ``standard`` retry mode and 10 attempts per request (``S3_RETRIES``; ``AWS_RETRY_MODE``
and ``AWS_MAX_ATTEMPTS`` override them), which retries 5xx answers (503 SlowDown included, also
on a HEAD, whose answer has no body for s3fs to recognise), throttling and dropped connections
with exponential backoff (up to 20 s between attempts); s3fs itself re-reads a response cut off
mid-body (5 tries). tests/test_s3_cache.py trains through a proxy that injects both.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from eaglecache.errors import UserError
from eaglecache.formats.cache import (
    CACHE_FILE, PART_FILES_GLOB, STATE_ARRAYS, fingerprint, is_aligned, is_fp8, missing_parts, parse_part_json,
    read_cache_json, sample_starts,
)
from eaglecache.formats.bits import bits_to_bf16, dequantize_fp8
from eaglecache.formats.shard_meta import consolidated_metadata, use_fast_codec_pipeline
from eaglecache.formats.shard_reader import ShardArrays


@dataclass
class Sample:
    """One sample's features: tokens and mask as in the prepared data set (unshifted), states in bf16."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # uint8 [T]
    aux: torch.Tensor  # bf16 [T, A, H]
    final: torch.Tensor  # bf16 [T, H], layer L's output before the final norm
    sample_id: int = -1


def read_parts(cache_dir: str | Path) -> list[tuple[Path | str, dict[str, Any]]]:
    """(part dir, part.json record) of every part present, in part order; never writes."""
    files = CacheFiles(cache_dir)
    parts = []
    for part_json in files.glob(PART_FILES_GLOB):
        try:
            text = files.read_text(part_json)
        except OSError as exc:
            raise UserError(f"{part_json}: unreadable ({exc.__class__.__name__})") from None
        record = parse_part_json(part_json, text)
        part_dir = part_json.parent if isinstance(part_json, Path) else part_json.rsplit("/", 1)[0]
        parts.append((part_dir, record))
    return parts


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


S3_RETRIES = {"mode": "standard", "max_attempts": 10}


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: retries for S3 (see the module docstring), nothing for other stores."""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    retries = {"mode": os.environ.get("AWS_RETRY_MODE") or S3_RETRIES["mode"],
               "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_RETRIES["max_attempts"])}
    options: dict[str, Any] = {"config_kwargs": {"retries": retries}}
    if os.environ.get("AWS_ENDPOINT_URL"):
        # fsspec reuses filesystem instances with equal arguments: naming the endpoint keeps an instance
        # made for one server from serving a later AWS_ENDPOINT_URL (botocore reads the variable only once)
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return options


class CacheFiles:
    """File access under a cache root: ``pathlib`` for a local path, fsspec for a URL.

    Paths it hands out are ``Path`` objects locally and URL strings remotely; the
    fsspec filesystem is looked up per call (fsspec caches instances), so the object
    pickles as just its root.
    """

    def __init__(self, root: str | Path):
        self.root: Path | str = str(root).rstrip("/") if is_url(root) else Path(root)

    def join(self, base: Path | str, *names: str) -> Path | str:
        return "/".join([base, *names]) if isinstance(base, str) else base.joinpath(*names)

    @staticmethod
    def _fs(url: str):
        import fsspec

        try:
            return fsspec.core.url_to_fs(url, **storage_options(url))[0]
        except ImportError as exc:  # e.g. s3:// without s3fs
            raise UserError(f"{url}: cannot open this URL ({exc})") from None

    def read_text(self, path: Path | str) -> str | None:
        """The file's text, or None when it does not exist."""
        if isinstance(path, Path):
            return path.read_text() if path.is_file() else None
        try:
            return self._fs(path).cat_file(path).decode()
        except FileNotFoundError:
            return None

    def glob(self, pattern: str) -> list[Path | str]:
        """Files matching ``pattern`` (relative to the root), sorted."""
        if isinstance(self.root, Path):
            return sorted(self.root.glob(pattern))
        fs = self._fs(self.root)
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(self.join(self.root, pattern)))

    def open_group(self, path: Path | str):
        """A shard's Zarr group, read-only, through its consolidated metadata."""
        store = path if isinstance(path, Path) else zarr.storage.FsspecStore.from_url(
            path, read_only=True, storage_options=storage_options(path))
        with consolidated_metadata():
            return zarr.open_group(store, mode="r", use_consolidated=True)


class FeatureCache:
    """Read-only view of all parts of a cache as one: ``read(sample_id)`` touches only that sample's chunks.

    The index (which shard, which token range) comes from the part.json files, so
    opening a cache reads no array data. Shards are opened lazily and a few are
    kept open. Picklable (data-loader workers reopen shards themselves).
    """

    max_open_shards = 64

    def __init__(self, path: str | Path, allow_partial: bool = False):
        use_fast_codec_pipeline()
        self.files = CacheFiles(path)
        self.path = self.files.root
        cache_json = self.files.join(self.path, CACHE_FILE)
        text = self.files.read_text(cache_json)
        if text is None:
            raise UserError(f"{self.path}: no {CACHE_FILE} (not a feature cache, or precompute has not started)")
        doc = read_cache_json(cache_json, text)
        self.version: int = doc["version"]
        self.metadata: dict[str, Any] = doc["metadata"]
        self.fp8 = is_fp8(self.metadata)
        aligned = is_aligned(self.version, self.metadata)
        # a v2 compressed cache: every sample starts a chunk and the rows after it up to the chunk's end are zeros
        self.chunk_rows: int | None = int(self.metadata["chunk_tokens"]) if aligned else None
        self.parts = read_parts(self.path)
        self._check_parts(allow_partial)
        self.skipped = [s for _, record in self.parts for s in record["skipped"]]
        self.shard_paths: list[Path | str] = []
        ids, shard_of, starts, lengths = [], [], [], []
        for part_dir, record in self.parts:
            for shard in record["shards"]:
                n = np.asarray(shard["sample_num_tokens"], dtype=np.int64)
                ids.append(np.asarray(shard["sample_ids"], dtype=np.int64))
                shard_of.append(np.full(len(n), len(self.shard_paths), dtype=np.int32))
                starts.append(sample_starts(n, self.metadata["chunk_tokens"], aligned)[0])
                lengths.append(n)
                self.shard_paths.append(self.files.join(part_dir, shard["name"]))
        cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
        ids = cat(ids, np.int64)
        order = np.argsort(ids, kind="stable")
        self.sample_ids = ids[order]
        if len(self.sample_ids) and (np.diff(self.sample_ids) == 0).any():
            dup = self.sample_ids[1:][np.diff(self.sample_ids) == 0][0]
            raise UserError(f"{self.path}: sample {dup} is stored in more than one shard")
        self._shard_of = cat(shard_of, np.int32)[order]
        self._start = cat(starts, np.int64)[order]
        self._length = cat(lengths, np.int64)[order]
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._located: tuple[int, tuple] | None = None

    def _check_parts(self, allow_partial: bool) -> None:
        want = fingerprint(self.metadata)
        for part_dir, record in self.parts:
            if record["cache_fingerprint"] != want:
                raise UserError(f"{part_dir}: belongs to a cache with other settings than {self.path}/{CACHE_FILE}")
        num_parts = self.metadata["num_parts"]
        missing = missing_parts(num_parts, (r for _, r in self.parts))
        if missing and not allow_partial:
            raise UserError(f"{self.path}: incomplete cache, parts {missing} of {num_parts} are missing or unfinished "
                            f"(run precompute --part-index I --num-parts {num_parts} for them)")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def total_tokens(self) -> int:
        return int(self._length.sum())

    def _find(self, sample_id: int) -> int:
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i == len(self.sample_ids) or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample {sample_id} is not in the cache")
        return i

    def num_tokens(self, sample_id: int) -> int:
        return int(self._length[self._find(sample_id)])

    def num_tokens_array(self) -> np.ndarray:
        """Tokens of every stored sample, in ``sample_ids`` order."""
        return self._length.copy()

    def shard(self, index: int) -> ShardArrays:
        """Shard ``index``'s arrays, read by token range (a small LRU of open shards; evicted ones close
        their files)."""
        arrays = self._open.get(index)
        if arrays is None:
            arrays = ShardArrays(self.files, self.shard_paths[index])
            self._open[index] = arrays
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(index)
        return arrays

    def read(self, sample_id: int) -> Sample:
        shard, start, length = self.locate(sample_id)
        stop = start + length
        states = {}
        for name in STATE_ARRAYS:
            if self.fp8:
                states[name] = dequantize_fp8(shard.read(name, start, stop), shard.read(f"{name}_scale", start, stop))
            else:
                states[name] = bits_to_bf16(shard.read(name, start, stop))
        return Sample(input_ids=shard.read("input_ids", start, stop), loss_mask=shard.read("loss_mask", start, stop),
                      aux=states["aux"], final=states["final"], sample_id=int(sample_id))

    @property
    def reads_into(self) -> bool:
        """Whether ``read_rows_into`` gives the states as ``read`` does (bf16 bits as stored; not FP8)."""
        return not self.fp8

    def read_rows_into(self, sample_id: int, name: str, first: int, out: np.ndarray) -> None:
        """Rows ``first:first + len(out)`` of sample ``sample_id``'s array ``name`` as stored (bf16 states as
        uint16 bits) into ``out``, decoded in place: the loader's path, with no copy between."""
        shard, start, length = self.locate(sample_id)
        if not 0 <= first <= first + len(out) <= length:
            raise IndexError(f"rows {first}:{first + len(out)} of sample {sample_id} ({length} tokens)")
        shard.read_into(name, start + first, start + first + len(out), out)

    def read_chunks_into(self, sample_id: int, name: str, num_rows: int, out: np.ndarray) -> int:
        """The first ``num_rows`` rows of the sample's array ``name`` as stored, decoded in place into ``out`` in
        whole chunks (``chunk_rows`` set only), zeros after them up to the returned row count (the end of the
        chunk holding row ``num_rows - 1``; ``out`` must be that long): the loader's copy-free path."""
        shard, start, length = self.locate(sample_id)
        if not 0 <= num_rows <= length:
            raise IndexError(f"{num_rows} rows of sample {sample_id} ({length} tokens)")
        padded = -(-num_rows // self.chunk_rows) * self.chunk_rows
        shard.read_chunks_into(name, start, start + padded, out[:padded])
        if num_rows < length:  # truncated: the rows decoded past num_rows are the sample's own
            out[num_rows:padded] = 0
        return padded

    def locate(self, sample_id: int) -> tuple[ShardArrays, int, int]:
        """(its shard's arrays, its first row there, its tokens) of a stored sample; the last one is remembered,
        as the loader asks for each array of a sample in turn."""
        if self._located is not None and self._located[0] == sample_id:
            return self._located[1]
        i = self._find(sample_id)
        found = (self.shard(int(self._shard_of[i])), int(self._start[i]), int(self._length[i]))
        self._located = (sample_id, found)
        return found

    def prefetch(self, sample_ids) -> None:
        """Start reading these samples' states from disk in the background (a hint: a local cache only;
        an unknown id is ignored), so that reading them next overlaps the disk with decoding."""
        for sample_id in sample_ids:
            i = int(np.searchsorted(self.sample_ids, sample_id))
            if i == len(self.sample_ids) or self.sample_ids[i] != sample_id:
                continue
            shard = self.shard(int(self._shard_of[i]))
            start = int(self._start[i])
            for name in STATE_ARRAYS:
                shard.prefetch(name, start, start + int(self._length[i]))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_located"] = None
        return state


def open_cache(path: str | Path, allow_partial: bool = False) -> FeatureCache:
    """Open a cache (a directory, or a URL such as s3://bucket/prefix) read-only as one logical store over
    all its parts (refuses unknown versions)."""
    return FeatureCache(path, allow_partial=allow_partial)
