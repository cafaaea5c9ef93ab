"""Reads token ranges of a cache shard's per-token arrays straight from the shard files' bytes.

Why: ``FeatureCache.read`` went through zarr for every array of every sample: zarr's asyncio
machinery and codec pipeline per call, the sharding index looked up per call, whole inner chunks
read and decoded. On the demo's cache (~210-token samples, 1,024-token zstd chunks) that read
14k tokens/s in shuffled order where the disk gives 230k (issue 15). The shard files are plain
zarr ``sharding_indexed`` files (precompute/shardfile.py writes them; zarr v3 spec, sharding
codec): inner chunks of ``chunk_shape[0]`` rows, then the index, one little-endian (offset,
nbytes) uint64 pair per inner chunk and the CRC-32C of those bytes. So a shard's metadata is
parsed once, each array's index is read and checked once, and a read of rows ``start:stop`` is:

- codec ``none``: ONE read of exactly those rows' bytes (chunks written back to back, as our
  writer writes them, are one byte range), no decode, no copy beyond the read itself;
- compressed (``zstd``, ``blosc``): one read per run of adjacent inner chunks, each chunk
  decoded with numcodecs, the very codec objects zarr's own ``ZstdCodec``/``BloscCodec`` call,
  straight into the caller's buffer (``read_into``) where the chunk's rows are all wanted. In a
  format-v2 cache each sample starts a chunk, so a sample is one run and decodes only its own rows;
  in v1 it decodes the whole chunks it shares with its neighbours;
- arrays of at most ``WHOLE_FILE_BYTES`` (token ids, masks, FP8 scales) are read whole once per shard;
- ``prefetch`` hints the kernel (``POSIX_FADV_WILLNEED``, in pieces of ``HINT_BYTES``: Linux caps
  one hint at the device's read-ahead size) to fetch ranges read soon, so the disk works while the
  reader decodes.

Any other layout (a codec we do not decode, chunks not made of whole rows) reports
``supported() == False`` and the caller reads it through zarr. tests/test_reader.py checks the
arrays are byte-equal to zarr's reads for every codec, FP8 included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np

_MISSING = np.uint64(2**64 - 1)  # an inner chunk never written: all fill value
_INDEX_ENTRY_BYTES = 16
WHOLE_FILE_BYTES = 4 << 20  # arrays this small (token ids, masks, FP8 scales) are read whole, once per shard
HINT_BYTES = 4 << 20  # one POSIX_FADV_WILLNEED per piece: a single 256 MiB hint brought in 8 MiB, 4 MiB pieces all


def _little_bytes(codec: dict) -> bool:
    return codec["name"] == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


def _decoder(codec: dict) -> Callable[[bytes], bytes] | None:
    """The numcodecs decoder zarr uses for this compressor document, or None for one we do not read."""
    conf = codec.get("configuration", {})
    if codec["name"] == "zstd":
        from numcodecs.zstd import Zstd

        return Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False)).decode
    if codec["name"] == "blosc":
        from numcodecs.blosc import Blosc

        return Blosc().decode  # blosc frames carry their own settings
    return None


def supported(doc: dict) -> bool:
    """True when the array of metadata ``doc`` is one shard of row chunks this module decodes."""
    codecs = doc.get("codecs", [])
    if (len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or doc.get("fill_value") != 0
            or doc["chunk_key_encoding"]["name"] != "default"):
        return False
    conf = codecs[0]["configuration"]
    inner = conf["codecs"]
    grid = doc["chunk_grid"]["configuration"]["chunk_shape"]
    return (
        conf.get("index_location", "end") == "end"
        and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"] and _little_bytes(conf["index_codecs"][0])
        and len(inner) in (1, 2) and _little_bytes(inner[0]) and (len(inner) == 1 or _decoder(inner[1]) is not None)
        and list(conf["chunk_shape"][1:]) == list(doc["shape"][1:]) and grid[0] >= doc["shape"][0]
        and list(grid[1:]) == list(doc["shape"][1:])
    )


def chunk_key(doc: dict) -> str:
    """The name of chunk (0, ..., 0), the array's one shard file, by its default chunk key encoding."""
    separator = doc["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
    return separator.join(["c"] + ["0"] * len(doc["shape"]))


class ByteSource:
    """Positional reads of one file: ``os.pread`` on a local path, ranged GETs through fsspec on a URL."""

    def __init__(self, path: Path | str, fs=None):
        self.path = path
        self._fd: int | None = None
        self._fs = fs  # the fsspec filesystem of a URL (the reader's, with its settings)
        self._size: int | None = None
        if isinstance(path, Path):
            self._fd = os.open(path, os.O_RDONLY)

    def size(self) -> int:
        if self._size is None:
            self._size = os.fstat(self._fd).st_size if self._fd is not None else int(self._fs.size(self.path))
        return self._size

    def read(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        buffer = bytearray(nbytes)
        self.read_into(offset, memoryview(buffer))
        return buffer

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` (a writable byte view) with the file's bytes from ``offset``."""
        nbytes, done = len(buffer), 0
        if self._fd is None:
            data = self._fs.cat_file(self.path, start=offset, end=offset + nbytes)
            done = len(data)
            buffer[:min(done, nbytes)] = data[:nbytes]
        else:
            while done < nbytes:  # preadv may return less than asked (signals, some file systems)
                got = os.preadv(self._fd, [buffer[done:]], offset + done)
                if got <= 0:
                    break
                done += got
        if done != nbytes:
            raise OSError(f"{self.path}: short read at byte {offset} ({done} of {nbytes})")

    def will_need(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading this range now (a local file; nothing for a URL)."""
        if self._fd is not None and hasattr(os, "posix_fadvise"):
            for piece in range(offset, offset + nbytes, HINT_BYTES):
                os.posix_fadvise(self._fd, piece, min(HINT_BYTES, offset + nbytes - piece), os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardArray:
    """One per-token array of a shard, read by token ranges; its sharding index is read once, lazily."""

    def __init__(self, doc: dict, path: Path | str, fs=None):
        conf = doc["codecs"][0]["configuration"]
        self.shape = tuple(doc["shape"])
        self.dtype = np.dtype(doc["data_type"]).newbyteorder("<")
        self.rows_per_chunk = int(conf["chunk_shape"][0])
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.num_chunks = -(-int(doc["chunk_grid"]["configuration"]["chunk_shape"][0]) // self.rows_per_chunk)
        self.decode = _decoder(conf["codecs"][1]) if len(conf["codecs"]) == 2 else None
        self.source = ByteSource(path, fs)
        self._index: np.ndarray | None = None
        self._last: tuple[int, np.ndarray] | None = None  # the last decoded chunk: neighbours share edge chunks
        self._scratch: np.ndarray | None = None  # where chunks only partly wanted are decoded
        self._buffer: np.ndarray | None = None  # what whole-chunk reads read into
        self._small: bool | None = None  # whether the file is small enough to read whole
        self._whole: np.ndarray | None = None  # a small array (ids, mask, scales), decoded at its first read

    def index(self) -> np.ndarray:
        """(offset, nbytes) per inner chunk, checked against the index's CRC-32C as zarr checks it."""
        if self._index is None:
            nbytes = self.num_chunks * _INDEX_ENTRY_BYTES + 4
            raw = bytes(self.source.read(self.source.size() - nbytes, nbytes))
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise OSError(f"{self.source.path}: the shard index fails its CRC-32C check (damaged file)")
            self._index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.num_chunks, 2)
        return self._index

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new C-contiguous array."""
        out = np.empty((max(0, stop - start),) + self.row_shape, self.dtype)
        self.read_into(start, stop, out)
        return out

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` into ``out`` (C-contiguous, that shape, this dtype): read and decoded in place,
        without an intermediate copy, except for chunks only partly wanted."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} out of range for {self.shape[0]} rows")
        if stop == start:
            return
        if self._small is None:
            self._small = self.source.size() <= WHOLE_FILE_BYTES
        if self._small:
            if self._whole is None:
                self._whole = np.empty((self.shape[0],) + self.row_shape, self.dtype)
                self._read_rows_into(0, self.shape[0], self._whole)
            out[...] = self._whole[start:stop]
            return
        self._read_rows_into(start, stop, out)

    def read_chunks_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Whole chunks: rows ``start:stop`` (both multiples of the chunk size; ``stop`` may pass the array's end up
        to its last chunk's, where zarr stores the fill value, 0) decoded straight into ``out``: no copy at all."""
        rows = self.rows_per_chunk
        if start % rows or stop % rows or not 0 <= start <= stop <= self.num_chunks * rows or self.decode is None:
            raise ValueError(f"rows {start}:{stop} are not whole compressed chunks of {rows} rows")
        if stop > start:
            first = start // rows
            entries = self.index()[first:stop // rows]
            offsets, sizes = entries[:, 0].tolist(), entries[:, 1].tolist()
            end = offsets[0] + sum(sizes)
            if offsets[0] != int(_MISSING) and all(b == a + n for a, n, b in zip(offsets, sizes, offsets[1:])):
                # as our writer writes them: one read of the chunks, back to back, into a buffer kept for the next
                data = self._read_buffer(end - offsets[0])
                self.source.read_into(offsets[0], data)
                pos = 0
                for k, size in enumerate(sizes):
                    self.decode(data[pos:pos + size], out=out[k * rows:(k + 1) * rows])
                    pos += size
                return
            for chunk, data in self._chunks(first, entries[:, 0], entries[:, 1]):
                target = out[(chunk - first) * rows:(chunk - first + 1) * rows]
                if data is None:
                    target[...] = 0
                elif isinstance(data, np.ndarray):
                    target[...] = data
                else:
                    self.decode(data, out=target)

    def _read_buffer(self, nbytes: int) -> memoryview:
        """A byte buffer this array reuses for its reads (fresh memory costs a page fault per 4 KiB)."""
        if self._buffer is None or len(self._buffer) < nbytes:
            self._buffer = np.empty(max(nbytes, 2 * len(self._buffer) if self._buffer is not None else 0), np.uint8)
        return memoryview(self._buffer)[:nbytes]

    def prefetch(self, start: int, stop: int) -> None:
        """Start the disk on rows ``start:stop`` without waiting, so that a later ``read`` finds them in
        the page cache: the reader decodes one sample while the disk fetches the next ones."""
        if stop <= start or (self._small if self._small is not None else self.source.size() <= WHOLE_FILE_BYTES):
            return
        exact = self._row_bytes_range(start, stop)
        if exact is not None:
            self.source.will_need(*exact)
            return
        first, last = start // self.rows_per_chunk, (stop - 1) // self.rows_per_chunk
        index = self.index()
        (begin, _), (end_offset, end_size) = index[first].tolist(), index[last].tolist()
        if begin != int(_MISSING) and end_offset != int(_MISSING) and end_offset + end_size > begin:
            self.source.will_need(begin, end_offset + end_size - begin)  # chunks written in order: one span
            return
        entries = index[first:last + 1]  # a layout written otherwise: the span of the chunks present
        present = entries[entries[:, 0] != _MISSING]
        if len(present):
            begin = int(present[:, 0].min())
            self.source.will_need(begin, int((present[:, 0] + present[:, 1]).max()) - begin)

    def _row_bytes_range(self, start: int, stop: int) -> tuple[int, int] | None:
        """(offset, nbytes) of rows ``start:stop`` when they are one plain byte range of the file:
        uncompressed chunks written back to back, as our writer writes them; else None."""
        if self.decode is not None:
            return None
        first, last = start // self.rows_per_chunk, (stop - 1) // self.rows_per_chunk
        offsets, sizes = self.index()[first:last + 1].T
        if ((offsets == _MISSING).any() or (sizes != self.rows_per_chunk * self.row_bytes).any()
                or (offsets[1:] != offsets[:-1] + sizes[:-1]).any()):
            return None
        return int(offsets[0]) + (start - first * self.rows_per_chunk) * self.row_bytes, (stop - start) * self.row_bytes

    def _read_rows_into(self, start: int, stop: int, out: np.ndarray) -> None:
        exact = self._row_bytes_range(start, stop)
        if exact is not None:  # no decode: one read of exactly these rows' bytes, straight into the result
            self.source.read_into(exact[0], memoryview(out).cast("B"))
            return
        first, last = start // self.rows_per_chunk, (stop - 1) // self.rows_per_chunk
        entries = self.index()[first:last + 1]
        for chunk, data in self._chunks(first, entries[:, 0], entries[:, 1]):
            base = chunk * self.rows_per_chunk
            lo, hi = max(start, base), min(stop, base + self.rows_per_chunk)
            target = out[lo - start:hi - start]
            if data is None:
                target[...] = 0
            elif isinstance(data, np.ndarray):  # the chunk decoded last time (v1 neighbours share edge chunks)
                target[...] = data[lo - base:hi - base]
            elif self.decode is not None and lo == base and hi == base + self.rows_per_chunk:
                self.decode(data, out=target)  # the whole chunk is wanted: decode straight into the result
            else:
                block = self._decoded(chunk, data)
                target[...] = block[lo - base:hi - base]

    def _chunks(self, first: int, offsets: np.ndarray, sizes: np.ndarray):
        """(chunk number, its encoded bytes, or its rows when decoded last time, or None for a missing chunk)
        of the chunks from ``first`` on, read in as few reads as there are runs of adjacent chunks in the file."""
        pending = []  # (chunk, offset, size) still to read
        for i, (offset, size) in enumerate(zip(offsets.tolist(), sizes.tolist())):
            chunk = first + i
            if offset == int(_MISSING):
                yield chunk, None
            elif self._last is not None and self._last[0] == chunk:
                yield chunk, self._last[1]
            else:
                pending.append((chunk, offset, size))
        pending.sort(key=lambda item: item[1])  # zarrs may write a shard's chunks in any order
        run: list[tuple[int, int, int]] = []
        for item in pending + [None]:
            if run and (item is None or item[1] != run[-1][1] + run[-1][2]):
                begin = run[0][1]
                data = self._read_buffer(run[-1][1] + run[-1][2] - begin)  # valid until the next run's read
                self.source.read_into(begin, data)
                for chunk, offset, size in run:
                    yield chunk, data[offset - begin:offset - begin + size]
                run = []
            if item is not None:
                run.append(item)

    def _decoded(self, chunk: int, data: memoryview) -> np.ndarray:
        """The chunk's rows, decoded (or copied, uncompressed) into a buffer this array reuses (a fresh one costs a
        page fault per 4 KiB); valid until the next partial decode, which is why callers copy out of it at once."""
        if self._scratch is None:
            self._scratch = np.empty(self.rows_per_chunk * self.row_bytes, np.uint8)
        if self.decode is None:  # a copy: the read buffer it came from is reused by the next read
            self._scratch[:len(data)] = np.frombuffer(data, np.uint8)
        else:
            self.decode(data, out=self._scratch)
        block = self._scratch.view(self.dtype).reshape((self.rows_per_chunk,) + self.row_shape)
        self._last = (chunk, block)
        return block

    def close(self) -> None:
        self.source.close()


class _ZarrRows:
    """Token ranges of an array through zarr itself: the path for layouts ``ShardArray`` does not decode."""

    def __init__(self, array):
        self.array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self.array[start:stop]

    def close(self) -> None:
        pass


class ShardArrays:
    """A shard's arrays by name, each read by token range: straight from the files where ``supported``,
    through zarr otherwise. ``files`` is the reader's ``CacheFiles`` (local paths or URLs)."""

    def __init__(self, files, shard_dir: Path | str):
        self.files, self.dir = files, shard_dir
        text = files.read_text(files.join(shard_dir, "zarr.json"))
        doc = json.loads(text) if text is not None else {}
        self.docs: dict[str, dict] = (doc.get("consolidated_metadata") or {}).get("metadata") or {}
        self._arrays: dict[str, ShardArray | _ZarrRows] = {}
        self._group = None

    def array(self, name: str) -> ShardArray | _ZarrRows:
        arr = self._arrays.get(name)
        if arr is None:
            doc = self.docs.get(name)
            if doc is not None and supported(doc):
                path = self.files.join(self.dir, name, chunk_key(doc))
                arr = ShardArray(doc, path, None if isinstance(path, Path) else self.files._fs(path))
            else:
                if self._group is None:
                    self._group = self.files.open_group(self.dir)
                arr = _ZarrRows(self._group[name])
            self._arrays[name] = arr
        return arr

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.array(name).read(start, stop)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        self.array(name).read_into(start, stop, out)

    def read_chunks_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        self.array(name).read_chunks_into(start, stop, out)

    def prefetch(self, name: str, start: int, stop: int) -> None:
        arr = self.array(name)
        if isinstance(arr, ShardArray):
            arr.prefetch(start, stop)

    def close(self) -> None:
        for arr in self._arrays.values():
            arr.close()
        self._arrays.clear()
