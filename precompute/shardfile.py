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
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c  # zarr's own dependency, the checksum its Crc32cCodec uses
import numpy as np
import zarr

_ZEROS = bytes(1 << 20)
_PIECE_BYTES = 64 << 20


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


def write_shard_file(array: zarr.Array, store_dir: Path, data: np.ndarray) -> None:
    """Write ``data`` (the array's full contents, C-contiguous) as the array's one shard file.

    ``store_dir`` is the directory of the zarr group holding ``array``.
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
    with open(path, "wb", buffering=0) as f:
        _write_all(f, memoryview(data).cast("B"))
        while pad_bytes > 0:
            step = min(pad_bytes, len(_ZEROS))
            _write_all(f, memoryview(_ZEROS)[:step])
            pad_bytes -= step
        _write_all(f, memoryview(index_bytes + crc))


def _write_all(f, view: memoryview) -> None:
    """Write all of ``view`` in pieces, starting the disk on each piece as soon as it is written.

    POSIX_FADV_DONTNEED on a written range starts its writeback now instead of when the kernel's
    dirty threshold is hit, so the disk works while we copy, the shard's fsync finds little left
    to do, and terabytes of cache written once do not push everything else out of the page cache.
    """
    while view:
        start = f.tell()
        piece = view[:_PIECE_BYTES]
        while piece:  # an unbuffered write may take fewer bytes than offered
            piece = piece[f.write(piece):]
        view = view[_PIECE_BYTES:]
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), start, f.tell() - start, os.POSIX_FADV_DONTNEED)

