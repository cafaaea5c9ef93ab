"""Writes a cache shard's uncompressed chunk files straight from its buffers, as zarr would.

Why: zarr's sharded assignment (``array[...] = data``) assembles the whole shard in a new
buffer and then copies it again into the store, so a 0.4 GB shard costs two extra passes
over memory and a fresh allocation (a page fault per 4 KiB). On a host whose cores also run
the target, that made the writer half as fast as the disk. With codec ``none`` the shard's
body is the array's own C-order bytes, so we hand those bytes to ``write`` as they are.

The bytes are exactly zarr's ``sharding_indexed`` layout (zarr v3 spec, sharding codec):
inner chunks one after another in chunk order, each the ``bytes``-codec (little-endian)
image of a full ``chunk_shape`` block (the edge block padded with the fill value), then the
index: for every inner chunk (offset, nbytes) as little-endian uint64, followed by the
CRC-32C of those index bytes. The array's metadata (``zarr.json``) comes from zarr itself
(eaglecache/formats/shard_meta.py), and tests check the file is byte-identical to the one zarr writes for
the same data. Only arrays chunked along the first axis (whole rows per chunk) take this path,
which is every per-token array of the cache; the shard's two small index arrays are one plain
chunk each (``write_plain_chunk``).

The bulk of the file goes out with O_DIRECT when the file system takes it and the buffer is
page-aligned (``aligned_empty``): the disk then reads the buffer itself, where a buffered write
first copies every byte into the page cache. That copy was most of the writer's CPU (on 2 cores,
buffered writes peaked at 1.9 GB/s while the disk took 3); O_DIRECT costs about 1 % of it, and
terabytes written once no longer pass through the page cache at all. The unaligned tail (the
last partial block, padding, index) is written buffered after it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import google_crc32c  # zarr's own dependency, the checksum its Crc32cCodec uses
import numpy as np

_ZEROS = bytes(1 << 20)
WRITE_BYTES = 64 << 20  # per write call: larger ones gained nothing on disk here, smaller ones lost up to 20 %
_ALIGN = 4096  # O_DIRECT wants buffer, length and offset aligned to the device's block; 4 KiB covers them all


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose first byte is 4 KiB-aligned, so that O_DIRECT can write it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _little_endian(dtype: np.dtype) -> bool:
    return dtype == dtype.newbyteorder("<")  # true for 1-byte types too


def _is_little_bytes_codec(codec: dict) -> bool:
    return codec["name"] == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


def _chunk_path(doc: dict, array_dir: Path) -> Path:
    """The file of chunk (0, ..., 0) under the array's directory, by its default chunk key encoding."""
    separator = doc["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    return Path(array_dir) / separator.join(["c"] + ["0"] * len(doc["shape"]))


def _matches(doc: dict, data: np.ndarray) -> bool:
    return (doc["chunk_key_encoding"]["name"] == "default" and doc["fill_value"] == 0
            and tuple(doc["shape"]) == data.shape and np.dtype(doc["data_type"]) == data.dtype
            and _little_endian(data.dtype))


def direct_write_supported(doc: dict, data: np.ndarray) -> bool:
    """True when the array of metadata ``doc`` (its ``zarr.json``) is one shard of uncompressed row
    chunks, the layout ``write_shard_file`` writes, and ``data`` fits it."""
    codecs = doc["codecs"]
    if not _matches(doc, data) or len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    conf = codecs[0]["configuration"]
    rows_per_chunk, row_shape = conf["chunk_shape"][0], data.shape[1:]
    return (
        len(conf["codecs"]) == 1 and _is_little_bytes_codec(conf["codecs"][0])
        and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
        and _is_little_bytes_codec(conf["index_codecs"][0])
        and conf["index_location"] == "end"
        and tuple(conf["chunk_shape"][1:]) == row_shape
        and tuple(doc["chunk_grid"]["configuration"]["chunk_shape"])
        == (-(-data.shape[0] // rows_per_chunk) * rows_per_chunk,) + row_shape
    )


def write_plain_chunk(doc: dict, array_dir: Path, data: np.ndarray) -> bool:
    """Write ``data`` as the chunk file of an uncompressed single-chunk array (a shard's ``offsets``
    and ``sample_ids``): its little-endian bytes. False, writing nothing, for any other layout."""
    if not (_matches(doc, data) and len(doc["codecs"]) == 1 and _is_little_bytes_codec(doc["codecs"][0])
            and doc["chunk_grid"]["configuration"]["chunk_shape"] == doc["shape"]):
        return False
    with open(_chunk_path(doc, array_dir), "wb") as f:
        f.write(np.ascontiguousarray(data).tobytes())
    return True


def write_shard_file(doc: dict, array_dir: Path, data: np.ndarray) -> bool:
    """Write ``data`` (the array's full contents) as the one shard file of the array whose metadata is
    ``doc`` and whose directory is ``array_dir``; ``direct_write_supported(doc, data)`` must hold.

    Returns whether the bulk went out with O_DIRECT (see the module docstring; buffered otherwise,
    same bytes).
    """
    if not direct_write_supported(doc, data):
        raise ValueError(f"{array_dir}: data {data.shape} {data.dtype} does not fit the shard layout of {doc['shape']} "
                         f"{doc['data_type']}")
    data = np.ascontiguousarray(data)
    rows_per_chunk = doc["codecs"][0]["configuration"]["chunk_shape"][0]
    num_chunks = doc["chunk_grid"]["configuration"]["chunk_shape"][0] // rows_per_chunk
    row_bytes = int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize
    chunk_bytes = rows_per_chunk * row_bytes
    pad_bytes = num_chunks * chunk_bytes - data.nbytes

    index = np.empty((num_chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(num_chunks, dtype=np.uint64) * np.uint64(chunk_bytes)
    index[:, 1] = chunk_bytes
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()

    path = _chunk_path(doc, array_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(data).cast("B")
    direct_bytes = _write_direct(path, view)
    with open(path, "r+b" if direct_bytes else "wb", buffering=0) as f:
        f.seek(direct_bytes)
        _write_all(f, view[direct_bytes:])
        while pad_bytes > 0:
            step = min(pad_bytes, len(_ZEROS))
            _write_all(f, memoryview(_ZEROS)[:step])
            pad_bytes -= step
        _write_all(f, memoryview(index_bytes + crc))
    return direct_bytes > 0


def _write_direct(path: Path, view: memoryview) -> int:
    """Write the block-aligned head of ``view`` to a new file at ``path`` with O_DIRECT; return its size.

    0 (nothing written) when the buffer is not aligned or the file system refuses O_DIRECT (some
    FUSE and network file systems do, at open or at the first write); the caller writes it all."""
    head = len(view) // _ALIGN * _ALIGN
    if not head or not hasattr(os, "O_DIRECT") or np.frombuffer(view, np.uint8, count=1).ctypes.data % _ALIGN:
        return 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return 0
    written = 0
    try:
        while written < head:
            num_bytes = os.write(fd, view[written:min(head, written + WRITE_BYTES)])
            written += num_bytes
            if num_bytes % _ALIGN:  # a short write off the block grid: the buffered writer takes it from here
                break
    except OSError as exc:
        if written or exc.errno != errno.EINVAL:
            raise  # a disk error (ENOSPC, EIO), not a refusal of O_DIRECT
        return 0
    finally:
        os.close(fd)
    return written


def _write_all(f, view: memoryview) -> None:
    """Write all of ``view`` in pieces, starting the disk on each piece as soon as it is written.

    POSIX_FADV_DONTNEED on a written range starts its writeback now instead of when the kernel's
    dirty threshold is hit, so the disk works while we copy, the shard's fsync finds little left
    to do, and terabytes of cache written once do not push everything else out of the page cache.
    """
    while view:
        start = f.tell()
        piece = view[:WRITE_BYTES]
        while piece:  # an unbuffered write may take fewer bytes than offered
            piece = piece[f.write(piece):]
        view = view[WRITE_BYTES:]
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), start, f.tell() - start, os.POSIX_FADV_DONTNEED)

