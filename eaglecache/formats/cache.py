"""The feature cache format, ``eaglecache.cache`` v2 (v1 still read; docs/formats.md section 2): layout, manifests, sizes.

A cache is one ``cache.json`` (format, version, metadata) and ``parts/``: one directory per
precompute job (a *part*, ``part-IIIII-of-NNNNN``) with its manifest ``part.json`` and the Zarr
groups it committed (*shards*, ``shard-SSSSS.zarr``), plus the part's lock file beside it. This
module owns those names, the metadata keys, the reading and validation of cache.json and
part.json, the fingerprint that ties a part to its cache, and the bytes one token takes. The
writer is precompute/writer.py, the reader eaglecache/formats/cache_reader.py; both import the layout from here.

Version 2 differs from 1 in where a sample's rows are: in a compressed cache each sample starts an
inner chunk (the rows after a sample up to the next chunk boundary are zeros, which compress to
nearly nothing), so reading a sample decodes its own tokens and no neighbour's; v1 packed samples
back to back, and a 210-token sample read through 1,024-token chunks decoded 5.9x its tokens.
``sample_starts`` is the rule both sides use.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from eaglecache.errors import UserError

FORMAT = "eaglecache.cache"
PART_FORMAT = "eaglecache.cache.part"
VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)
CACHE_FILE = "cache.json"
PART_FILE = "part.json"
PARTS_DIR = "parts"
LOCK_SUFFIX = ".lock"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".zarr"
SHARD_GLOB = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"  # the shards present in a part directory
PART_FILES_GLOB = f"{PARTS_DIR}/part-*/{PART_FILE}"  # every part's manifest, relative to the cache root
SHARD_DOCS_GLOB = f"{PARTS_DIR}/part-*/{SHARD_GLOB}/zarr.json"  # every shard's group document

FP8_DTYPE = "fp8_e4m3"  # metadata["dtype"] of a lossy FP8 cache; "bfloat16" otherwise
STATE_ARRAYS = ("aux", "final")  # hidden states: bf16 bits, or e4m3 bits with a *_scale array in FP8 mode

# cache.json's metadata, identical in every job of one cache (docs/formats.md section 2 says what each is)
METADATA_KEYS = (
    "aux_layer_ids", "final_layer_id", "num_hidden_layers", "layer_convention", "final_prenorm", "hidden_size",
    "vocab_size", "target_path", "target_weights_hash", "tokenizer_hash", "chat_template_hash", "dataset_hash",
    "dataset_num_samples", "vllm_version", "tensor_parallel_size", "dtype", "compute_dtype", "codec",
    "codec_level", "chunk_tokens", "shard_tokens", "num_parts", "config",
)
LAYER_CONVENTION = "vllm: id k = residual stream after k decoder layers = HF hidden_states[k]"


def part_name(part_index: int, num_parts: int) -> str:
    """The directory of part ``part_index`` of ``num_parts`` under ``parts/``."""
    return f"part-{part_index:05d}-of-{num_parts:05d}"


def part_dir(cache_dir: str | Path, part_index: int, num_parts: int) -> Path:
    return Path(cache_dir) / PARTS_DIR / part_name(part_index, num_parts)


def lock_path(cache_dir: str | Path, name: str) -> Path:
    """The lock file of part ``name``: beside its directory, so removing a part never removes its lock."""
    return Path(cache_dir) / PARTS_DIR / f"{name}{LOCK_SUFFIX}"


def shard_name(shard_index: int) -> str:
    return f"{SHARD_PREFIX}{shard_index:05d}{SHARD_SUFFIX}"


def shard_number(name: str) -> int:
    """The index in a shard's name (``shard-00007.zarr`` -> 7)."""
    return int(name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)])


def is_fp8(metadata: dict[str, Any]) -> bool:
    return metadata["dtype"] == FP8_DTYPE


def bytes_per_token(num_aux_layers: int, hidden_size: int, fp8: bool = False) -> int:
    """Raw (uncompressed) bytes one token takes in a shard: int32 id, uint8 mask, and (aux + final) layers
    of ``hidden_size`` bf16 values, or in FP8 mode one byte each plus a float32 scale per layer."""
    layers = num_aux_layers + 1
    ids_and_mask = 4 + 1
    if fp8:
        return ids_and_mask + layers * hidden_size + 4 * layers
    return ids_and_mask + 2 * layers * hidden_size


def metadata_bytes_per_token(metadata: dict[str, Any], fp8: bool | None = None) -> int:
    """``bytes_per_token`` of the cache ``metadata`` describes (``fp8`` given: as if stored that way)."""
    return bytes_per_token(len(metadata["aux_layer_ids"]), int(metadata["hidden_size"]),
                           is_fp8(metadata) if fp8 is None else fp8)


CHUNK_TARGET_BYTES = 256 << 10  # aux bytes per inner chunk when chunk_tokens is left to the writer
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 16, 1024


def default_chunk_tokens(num_aux_layers: int, hidden_size: int) -> int:
    """Tokens per inner chunk for a cache whose config leaves it open: the power of two that holds about
    ``CHUNK_TARGET_BYTES`` of aux states, within [16, 1024]. Requests do not depend on it (a v2 sample's
    chunks are one byte range); zstd decodes ~100 KiB chunks as fast as larger ones and smaller ones up
    to 30 % slower (demo states, 2026-12-07), and smaller chunks pad less in a cache stored uncompressed.
    Hidden 256 x 3 aux layers: 256 tokens; hidden 6144: 16."""
    row = 2 * num_aux_layers * hidden_size
    tokens = 1 << max(0, (CHUNK_TARGET_BYTES // row - 1).bit_length())
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, tokens))


SMALL_ARRAY_CHUNK_ROWS = 16384  # v2: the inner chunk of the per-token arrays that are read whole, once per shard


def chunk_rows(name: str, chunk_tokens: int, codec: str) -> int:
    """The inner chunk (rows) of a shard's per-token array ``name`` as the writer writes it (v2): ``chunk_tokens``
    for the states, which are read a sample at a time, and for anything uncompressed (read as exact byte
    ranges); ``SMALL_ARRAY_CHUNK_ROWS`` (or more) for compressed token ids, masks and FP8 scales, a few bytes a
    token, read whole once per shard (at 16 tokens a chunk a 20,000-token shard's ids were 1,250 decodes,
    more CPU than its states)."""
    return chunk_tokens if name in STATE_ARRAYS or codec == "none" else max(chunk_tokens, SMALL_ARRAY_CHUNK_ROWS)


def is_aligned(version: int, metadata: dict[str, Any]) -> bool:
    """Whether samples start at chunk boundaries: v2 caches with a codec (uncompressed rows are read as exact
    byte ranges whatever their chunk, so padding them would only cost disk)."""
    return version >= 2 and metadata["codec"] != "none"


def sample_starts(lengths, chunk_tokens: int, aligned: bool) -> tuple[np.ndarray, int]:
    """(first row of each sample, rows of the shard's per-token arrays) for samples of ``lengths`` tokens in
    stored order: back to back, or (``aligned``) each at the next multiple of ``chunk_tokens``; the rows
    end with the last sample (zarr fills the rest of its chunk)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not aligned:
        starts = np.cumsum(lengths) - lengths
    else:
        padded = -(-lengths // chunk_tokens) * chunk_tokens
        starts = np.cumsum(padded) - padded
    rows = int(starts[-1] + lengths[-1]) if len(lengths) else 0
    return starts, rows


def shard_shapes(num_tokens: int, num_samples: int, metadata: dict[str, Any],
                 num_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """The arrays of a shard of ``num_samples`` samples and ``num_tokens`` tokens stored in ``num_rows`` rows
    (v2, aligned: more than its tokens), with their shapes."""
    t, a, h = num_tokens if num_rows is None else num_rows, len(metadata["aux_layer_ids"]), int(metadata["hidden_size"])
    shapes = {"input_ids": (t,), "loss_mask": (t,), "aux": (t, a, h), "final": (t, h),
              "offsets": (num_samples + 1,), "sample_ids": (num_samples,)}
    if num_rows is not None:
        shapes["num_tokens"] = (num_samples,)
    if is_fp8(metadata):
        shapes.update(aux_scale=(t, a), final_scale=(t,))
    return shapes


def fingerprint(metadata: dict[str, Any]) -> str:
    """sha256 of the cache metadata: every part records it, so parts of different caches never mix."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def cache_document(metadata: dict[str, Any], version: int = VERSION) -> dict[str, Any]:
    """What cache.json holds."""
    return {"format": FORMAT, "version": version, "metadata": metadata}


def read_cache_json(path: Path | str, text: str | None = None) -> dict[str, Any]:
    """cache.json at ``path`` (or its ``text``, already fetched from a remote store), checked."""
    try:
        doc = json.loads(Path(path).read_text() if text is None else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable {CACHE_FILE} ({exc.__class__.__name__})") from None
    if doc.get("format") != FORMAT:
        raise UserError(f"{path}: not an eaglecache feature cache (format {doc.get('format')!r})")
    if doc.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: cache format version {doc.get('version')!r} is not supported "
                        f"(this code reads v{', v'.join(map(str, READABLE_VERSIONS))})")
    return doc


def new_part_record(part_index: int, num_parts: int, metadata: dict[str, Any],
                    sample_range: tuple[int, int] | None) -> dict[str, Any]:
    """part.json of a part that has committed nothing yet."""
    return {"format": PART_FORMAT, "version": VERSION, "part_index": part_index, "num_parts": num_parts,
            "cache_fingerprint": fingerprint(metadata), "sample_range": list(sample_range) if sample_range else None,
            "complete": False, "shards": [], "skipped": []}


def parse_part_json(path: Path | str, text: str | None) -> dict[str, Any]:
    """The record of the part.json at ``path`` whose content is ``text``, checked for format and version."""
    try:
        record = json.loads(text or "")
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: unreadable ({exc.__class__.__name__})") from None
    if record.get("format") != PART_FORMAT or record.get("version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: part format {record.get('format')!r} v{record.get('version')!r} "
                        f"is not supported (this code reads {PART_FORMAT} v{', v'.join(map(str, READABLE_VERSIONS))})")
    return record


def listed_shards(part_path: Path) -> set[str] | None:
    """Names of the shards a local part's part.json lists (empty when there is none yet); None when it is
    unreadable (the writer then refuses the part with its own error)."""
    path = part_path / PART_FILE
    if not path.exists():
        return set()
    try:
        return {s["name"] for s in json.loads(path.read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def missing_parts(num_parts: int, records: Iterable[dict[str, Any]]) -> list[int]:
    """Indices of the cache's parts that are absent or not marked complete."""
    done = {r["part_index"] for r in records if r["complete"] and r["num_parts"] == num_parts}
    return [i for i in range(num_parts) if i not in done]
