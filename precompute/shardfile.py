"""Writes an uncompressed per-token array's Zarr v3 shard file straight from its buffer.

Why: zarr's sharded assignment (``array[...] = data``) assembles the whole shard in a new
buffer and then copies it again into the store, so a 0.4 GB shard costs two extra passes
over memory and a fresh allocation (a page fault per 4 KiB). On a host whose cores also run
the target, that made the writer half as fast as the disk. With codec ``none`` the shard's
body is the array's own C-order bytes, so we hand those bytes to ``write`` as they are.

The bytes are exactly zarr's ``sharding_indexed`` layout (zarr v3 spec, sharding codec):
inner chunks one after another in chunk order, each the ``bytes``-codec (little-endian)
image of a full ``chunk_shape`` block (the edge block padded with the fill value), then the
index: for every inner chunk (offset, nbytes) as little-endian uint64, followed by the
CRC-32C of those index bytes. The array's metadata (``zarr.json``) is still written by zarr
itself, and tests check the file is byte-identical to the one zarr writes for the same data.
Only arrays chunked along the first axis (whole rows per chunk) take this path, which is every
per-token array of the cache.

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
import zarr

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


def direct_write_supported(array: zarr.Array) -> bool:
    """True when ``array`` is one shard of uncompressed row chunks in the layout this module writes."""
    meta = array.metadata.to_dict()
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return False
    conf = codecs[0]["configuration"]
    rows_per_chunk, row_shape = conf["chunk_shape"][0], tuple(array.shape[1:])
    return (
        [c["name"] for c in conf["codecs"]] == ["bytes"]
        and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"  # none for 1-byte types
        and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
        and conf["index_codecs"][0].get("configuration", {}).get("endian") == "little"
        and conf["index_location"] == "end"
        and tuple(conf["chunk_shape"][1:]) == row_shape
        and tuple(array.shards) == (-(-array.shape[0] // rows_per_chunk) * rows_per_chunk,) + row_shape
        and array.fill_value == 0
        and array.dtype == array.dtype.newbyteorder("<")  # our bytes are the host's: little-endian ones
    )


def write_shard_file(array: zarr.Array, store_dir: Path, data: np.ndarray) -> bool:
    """Write ``data`` (the array's full contents, C-contiguous) as the array's one shard file.

    ``store_dir`` is the directory of the zarr group holding ``array``. Returns whether the bulk
    went out with O_DIRECT (see the module docstring; buffered otherwise, same bytes).
    """
    if data.shape != array.shape or data.dtype != array.dtype:
        raise ValueError(f"{array.path}: data {data.shape} {data.dtype} does not match {array.shape} {array.dtype}")
    data = np.ascontiguousarray(data)
    rows_per_chunk = array.chunks[0]
    num_chunks = array.shards[0] // rows_per_chunk
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * data.dtype.itemsize
    chunk_bytes = rows_per_chunk * row_bytes
    pad_bytes = num_chunks * chunk_bytes - data.nbytes

    index = np.empty((num_chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(num_chunks, dtype=np.uint64) * np.uint64(chunk_bytes)
    index[:, 1] = chunk_bytes
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()

    path = Path(store_dir) / array.path / array.metadata.encode_chunk_key((0,) * array.ndim)
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

