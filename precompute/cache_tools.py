"""``eaglecache cache info`` and ``eaglecache cache verify``: what a cache holds, and is it intact.

``verify`` re-reads every shard listed in the part manifests and checks array
shapes against the manifest and cache metadata, offsets against the per-sample
token counts, the CRC-32C recorded at write time, and that no state is NaN/Inf.
Each damaged shard is named; the exit code is 1 when any is. With ``--repair``
the damaged shards are dropped from their part's manifest (the directory is
moved aside) and the part is marked unfinished, so the next precompute run of
that part recomputes exactly those samples.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from eaglecache.errors import UserError
from eaglecache.formats.bits import BF16_EXPONENT, checksum
from eaglecache.formats.cache import (
    CACHE_FILE, FORMAT, PART_FILE, SHARD_DOCS_GLOB, STATE_ARRAYS, VERSION, is_aligned, is_fp8,
    metadata_bytes_per_token, missing_parts, read_cache_json, sample_starts, shard_shapes,
)
from eaglecache.formats.cache_reader import CacheFiles, is_url, open_cache, read_parts
from eaglecache.formats.shard_meta import use_fast_codec_pipeline
from eaglecache.precompute.writer import write_json_atomic

FP8_NAN = 0x7F  # e4m3fn has no Inf; NaN is S.1111.111


def run_info(cache_path: str | Path) -> int:
    """Print what the cache at ``cache_path`` (a directory or a URL) holds; 0."""
    cache = open_cache(cache_path, allow_partial=True)
    meta = cache.metadata
    parts = cache.parts
    nbytes = sum(s["nbytes"] for _, r in parts for s in r["shards"])
    tokens = cache.total_tokens
    raw_per_token = metadata_bytes_per_token(meta, fp8=False)
    done = sum(1 for _, r in parts if r["complete"])
    print(f"cache      {cache.path} ({FORMAT} v{cache.version})")
    print(f"target     {meta['target_path']} (weights {meta['target_weights_hash'][:12]}, "
          f"{meta['num_hidden_layers']} layers, hidden {meta['hidden_size']}, vocab {meta['vocab_size']})")
    print(f"layers     aux {meta['aux_layer_ids']} + final {meta['final_layer_id']} (pre-norm); {meta['layer_convention']}")
    print(f"storage    {meta['dtype']}, codec {meta['codec']} level {meta['codec_level']}, "
          f"{meta['chunk_tokens']} tokens/chunk, ~{meta['shard_tokens']} tokens/shard")
    print(f"computed   in {meta.get('compute_dtype', 'an unrecorded dtype')} by the target")
    print(f"data       dataset {str(meta['dataset_hash'])[:12]} ({meta['dataset_num_samples']} samples), "
          f"tokenizer {meta['tokenizer_hash'][:12]}, chat template {meta['chat_template_hash'][:12]}")
    print(f"made by    vLLM {meta['vllm_version']}, TP {meta['tensor_parallel_size']}")
    print(f"parts      {done} of {meta['num_parts']} complete"
          + ("" if done == meta["num_parts"] else "  (INCOMPLETE: run the missing --part-index jobs)"))
    print(f"contents   {len(cache)} samples, {tokens} tokens, "
          f"{sum(len(r['shards']) for _, r in parts)} shards, {len(cache.skipped)} skipped (NaN/Inf)")
    if tokens:
        print(f"size       {nbytes / 1e9:.3f} GB on disk, {nbytes / tokens:,.0f} bytes/token "
              f"(raw bf16 {raw_per_token:,} bytes/token, {raw_per_token * tokens / nbytes:.2f}x)")
    return 0


def _nonfinite(name: str, data: np.ndarray, fp8: bool) -> int:
    if fp8:
        return int(((data & 0x7F) == FP8_NAN).sum()) if name in STATE_ARRAYS else int((~np.isfinite(data)).sum())
    return int(((data & BF16_EXPONENT) == BF16_EXPONENT).sum())


def verify_shard(files: CacheFiles, path: Path | str, shard: dict, meta: dict, version: int = VERSION) -> list[str]:
    """Problems found in one shard (empty when intact) of a cache of format ``version``; ``path`` local or a
    URL under ``files``' root."""
    exists = path.is_dir() if isinstance(path, Path) else files.read_text(files.join(path, "zarr.json")) is not None
    if not exists:
        return ["directory missing"]
    try:
        group = files.open_group(path)
    except Exception as exc:  # damaged metadata: report, do not crash the whole check
        return [f"cannot open ({exc.__class__.__name__}: {exc})"]
    fp8 = is_fp8(meta)
    starts, num_rows = sample_starts(shard["sample_num_tokens"], meta["chunk_tokens"], is_aligned(version, meta))
    expected = shard_shapes(shard["num_tokens"], shard["num_samples"], meta,
                            num_rows if is_aligned(version, meta) else None)
    problems = []
    for name, shape in expected.items():
        try:
            data = group[name][...]
        except Exception as exc:
            problems.append(f"{name}: unreadable ({exc.__class__.__name__}: {exc})")
            continue
        if data.shape != shape:
            problems.append(f"{name}: shape {data.shape}, expected {shape}")
            continue
        recorded = shard["checksums"].get(name, "crc32c:")
        if (actual := checksum(data, recorded.split(":")[0])) != recorded:
            problems.append(f"{name}: checksum {actual} != {recorded} recorded at write")
        if (name in STATE_ARRAYS or name.removesuffix("_scale") in STATE_ARRAYS) and (bad := _nonfinite(name, data, fp8)):
            problems.append(f"{name}: {bad} NaN/Inf values")
        if name == "offsets" and not np.array_equal(data, np.concatenate([starts, [num_rows]])):
            problems.append("offsets disagree with the manifest's token counts")
        if name == "num_tokens" and data.tolist() != shard["sample_num_tokens"]:
            problems.append("num_tokens disagree with the manifest")
        if name == "sample_ids" and data.tolist() != shard["sample_ids"]:
            problems.append("sample_ids disagree with the manifest")
    return problems


def run_verify(cache_path: str | Path, repair: bool = False) -> int:
    """Check every shard of the cache at ``cache_path``; 1 when one is damaged or unlisted, else 0.
    ``repair``: drop damaged shards from their manifests so the next precompute recomputes them."""
    from tqdm import tqdm

    use_fast_codec_pipeline()
    files = CacheFiles(cache_path)
    root = files.root
    if repair and is_url(root):
        raise UserError(f"{root}: --repair changes manifests in place and works on local caches only; "
                        "verify without it, or repair a local copy")
    text = files.read_text(files.join(root, CACHE_FILE))
    if text is None:
        raise UserError(f"{root}: no {CACHE_FILE} (not a feature cache)")
    doc = read_cache_json(files.join(root, CACHE_FILE), text)
    meta, version = doc["metadata"], doc["version"]
    parts = read_parts(root)
    shards = [(part_dir, record, shard) for part_dir, record in parts for shard in record["shards"]]
    damaged: dict[Path | str, list[dict]] = {}
    for part_dir, record, shard in tqdm(shards, desc="verify", unit="shard", dynamic_ncols=True):
        path = files.join(part_dir, shard["name"])
        problems = verify_shard(files, path, shard, meta, version)
        if problems:
            damaged.setdefault(part_dir, []).append(shard)
            tqdm.write(f"DAMAGED {path}: " + "; ".join(problems))
    listed = {str(files.join(part_dir, shard["name"])) for part_dir, _, shard in shards}
    # a killed run renamed it into place but never recorded it
    present = [str(p)[:-len("/zarr.json")] for p in files.glob(SHARD_DOCS_GLOB)]
    unlisted = [path for path in present if path not in listed]
    for path in unlisted:
        print(f"UNLISTED {path}: shard data without a manifest entry (not read; the next precompute of "
              "the part removes it, as does --repair)")
    missing = missing_parts(meta["num_parts"], (r for _, r in parts))
    num_damaged = sum(len(v) for v in damaged.values())
    print(f"{root}: {len(shards)} shards checked, {num_damaged} damaged, {len(unlisted)} unlisted"
          + (f"; parts {missing} missing or unfinished" if missing else ""))
    if repair:
        if num_damaged:
            _repair(parts, damaged)
        for path in unlisted:
            shutil.rmtree(path)
    return 1 if num_damaged or unlisted else 0


def _repair(parts, damaged: dict[Path, list[dict]]) -> None:
    """Drop damaged shards from their manifests so the next run of each part recomputes them."""
    for part_dir, record in parts:
        bad = damaged.get(part_dir)
        if not bad:
            continue
        names = {s["name"] for s in bad}
        record["shards"] = [s for s in record["shards"] if s["name"] not in names]
        record["complete"] = False
        for name in names:  # moved aside first, so a crash here leaves nothing half-listed
            if (part_dir / name).exists():
                os.rename(part_dir / name, part_dir / f"{name}.tmp-damaged")
        write_json_atomic(part_dir / PART_FILE, record, compact=True)
        print(f"repair: {part_dir.name}: {len(names)} shards ({sum(s['num_samples'] for s in bad)} samples) "
              "re-queued; rerun precompute for this part")
