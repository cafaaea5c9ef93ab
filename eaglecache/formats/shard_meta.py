"""A cache shard's Zarr metadata documents (made by zarr once per layout, re-shaped for each shard), and
how zarr is set up to write and read shards (its codec pipeline, consolidated metadata).

Why: creating a shard's group, its arrays and the consolidated metadata through zarr's API costs
about 20 ms of Python per shard (zarr's asyncio machinery), in the vLLM worker whose main thread
drives the target's forward pass and waits for the GIL meanwhile. On the tiny target that was 5 %
of precompute's throughput. The shards of one part differ only in their shapes, so zarr builds
the documents once, in a temporary directory, and each shard writes copies with its own shapes.

The documents are zarr's: the group's ``zarr.json`` (attributes and inline consolidated metadata)
and one ``zarr.json`` per array. tests/test_shardmeta.py checks they equal what zarr writes for
the same shard and that zarr reads the shard back.
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from eaglecache.errors import UserError
from eaglecache.formats.cache import chunk_rows

GROUP_DOC = "zarr.json"
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}  # c.0.0.0: no nested directories to fsync


def use_fast_codec_pipeline() -> bool:
    """Route zarr's codecs through the Rust ``zarrs`` pipeline when it is installed (3-5x faster here)."""
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    return True


@contextmanager
def consolidated_metadata():
    """One metadata file per shard instead of one per array; zarr warns that this is not in the v3 spec yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def shard_shape(shape: tuple[int, ...], chunk_tokens: int) -> tuple[int, ...]:
    """The one shard (file) of a per-token array: its tokens rounded up to whole inner chunks."""
    return (-(-shape[0] // chunk_tokens) * chunk_tokens,) + tuple(shape[1:])


def compressors(codec: str, level: int, itemsize: int):
    """zarr compressors for ``codec`` (precompute.codec) on items of ``itemsize`` bytes."""
    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=level)
    if codec == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=min(level, 9), shuffle="bitshuffle", typesize=itemsize)
    raise UserError(f"unknown codec {codec!r} (expected none, zstd or blosc-zstd)")


def shard_documents(arrays: dict[str, np.ndarray], per_token: set[str], *, chunk_tokens: int, codec: str,
                    codec_level: int, attributes: dict[str, Any]) -> dict[str, dict]:
    """Metadata documents (path in the shard -> JSON object) for a shard holding ``arrays``.

    Per-token arrays: one shard of inner chunks of ``chunk_rows(name, chunk_tokens, codec)`` rows (``chunk_tokens``
    for the states), compressed with ``codec``; the others: one uncompressed chunk.
    """
    layout = tuple((name, data.dtype.str, tuple(data.shape[1:]), chunk_rows(name, chunk_tokens, codec)
                    if name in per_token else 0) for name, data in arrays.items())
    docs = json.loads(_template(layout, chunk_tokens, codec, codec_level, json.dumps(attributes, sort_keys=True)))
    consolidated = docs[GROUP_DOC]["consolidated_metadata"]["metadata"]
    for name, data in arrays.items():
        doc = docs[f"{name}/{GROUP_DOC}"]
        doc["shape"] = list(data.shape)
        grid = shard_shape(data.shape, chunk_rows(name, chunk_tokens, codec)) if name in per_token else data.shape
        doc["chunk_grid"]["configuration"]["chunk_shape"] = list(grid)
        consolidated[name] = doc  # the same document, inline
    return docs


def write_documents(shard_dir: Path, docs: dict[str, dict]) -> None:
    """Write the documents under ``shard_dir``, as compact JSON (zarr indents; json's C encoder does not)."""
    for key, doc in docs.items():
        path = shard_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(doc, separators=(",", ":")))


@functools.lru_cache(maxsize=8)
def _template(layout: tuple, chunk_tokens: int, codec: str, codec_level: int, attributes_json: str) -> str:
    """zarr's documents for a shard of this layout, with placeholder shapes (one chunk of tokens), as
    one JSON text: parsing it is how each shard gets its own copy (faster than ``copy.deepcopy``)."""
    with tempfile.TemporaryDirectory(prefix="eaglecache-shard-template-") as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes=json.loads(attributes_json))
        for name, dtype_str, row_shape, rows in layout:  # rows: the inner chunk of a per-token array, else 0
            dtype = np.dtype(dtype_str)
            shape = (rows,) + row_shape if rows else (1,) + row_shape
            group.create_array(
                name, shape=shape, dtype=dtype,
                chunks=(rows,) + row_shape if rows else shape,
                shards=shard_shape(shape, rows) if rows else None,
                compressors=compressors(codec, codec_level, dtype.itemsize) if rows else None,
                fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
            )
        with consolidated_metadata():
            zarr.consolidate_metadata(tmp)
        root = Path(tmp)
        return json.dumps({str(path.relative_to(root)): json.loads(path.read_text())
                           for path in sorted(root.rglob(GROUP_DOC))})
