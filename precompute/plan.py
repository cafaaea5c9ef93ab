"""``eaglecache plan``: storage and bandwidth planning for a feature cache, before any GPU runs.

Bytes per token follow the cache format (``formats.cache.bytes_per_token``): int32
input id, uint8 loss mask, and (num_aux + 1) * hidden_size bf16 values (half that
in FP8 mode, plus a float32 scale per stored row). Lossless codecs are given as ratios:
measured on a real cache when ``--cache`` is passed, otherwise nominal figures
measured on synthetic bf16 activations (labelled as such). Every figure printed can
be checked by hand from the ones printed above it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from eaglecache.errors import UserError
from eaglecache.formats.cache import bytes_per_token, metadata_bytes_per_token
from eaglecache.target import default_aux_layer_ids

# Compression ratios of lossless codecs on synthetic bf16 activations (zarr 3.1, level 1; blosc-zstd
# with bitshuffle): estimates only, since real states compress differently; --cache measures one.
NOMINAL_CODEC_RATIOS = {"none": 1.0, "zstd": 1.28, "blosc-zstd": 1.41}
GB = 1e9
TB = 1e12


def measured_codec_ratio(cache_path: str) -> tuple[str, float]:
    """(codec, raw bytes / bytes on disk) of an existing cache, from the sizes its parts recorded."""
    from eaglecache.formats.cache_reader import open_cache

    cache = open_cache(cache_path, allow_partial=True)
    meta = cache.metadata
    if not cache.total_tokens:
        raise UserError(f"{cache_path}: no committed shard to measure")
    raw = metadata_bytes_per_token(meta)
    on_disk = sum(shard["nbytes"] for _, record in cache.parts for shard in record["shards"])
    return meta["codec"], raw * cache.total_tokens / on_disk


@dataclass(frozen=True)
class StoragePlan:
    num_samples: int
    num_tokens: int
    hidden_size: int
    num_aux_layers: int
    shard_tokens: int
    fp8: bool

    @property
    def states_per_token(self) -> int:
        return (self.num_aux_layers + 1) * self.hidden_size

    @property
    def raw_bytes_per_token(self) -> int:
        return bytes_per_token(self.num_aux_layers, self.hidden_size, self.fp8)

    @property
    def raw_bytes(self) -> int:
        return self.num_tokens * self.raw_bytes_per_token

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_tokens / self.shard_tokens)

    def bytes_on_disk(self, codec_ratio: float) -> float:
        return self.raw_bytes / codec_ratio

    def rate_bytes_per_s(self, tokens_per_s: float, codec_ratio: float) -> float:
        return tokens_per_s * self.raw_bytes_per_token / codec_ratio


def _target_dims(config) -> tuple[int, int]:
    """(hidden_size, num_hidden_layers) of the configured target (the text part of a VL config)."""
    from eaglecache.target import resolve_target, target_config  # noqa: builds the tiny target if needed

    text = target_config(resolve_target(config))
    return int(text["hidden_size"]), int(text["num_hidden_layers"])


def _dataset_counts(data: str | Path) -> tuple[int, int]:
    from eaglecache.formats.dataset import open_dataset

    meta = open_dataset(data).metadata
    return int(meta["num_samples"]), int(meta["num_tokens"])


def run_plan(config, *, data: str | Path | None = None, num_samples: int | None = None,
             mean_tokens: float | None = None, hidden_size: int | None = None, num_layers: int | None = None,
             precompute_tokens_per_s: float = 50_000.0, train_tokens_per_s: float = 100_000.0,
             cache: str | None = None, output: str | Path | None = None) -> int:
    """Print the plan of a cache of the prepared data set ``data`` (or ``num_samples`` of ``mean_tokens``);
    ``cache``: measure the codec ratio on it; ``output``: warn when the planned cache would not fit there."""
    if data:
        num_samples, num_tokens = _dataset_counts(data)
    elif num_samples and mean_tokens:
        num_tokens = int(round(num_samples * mean_tokens))
    else:
        raise UserError("give --data DIR, or --num-samples N and --mean-tokens M")
    if not (hidden_size and num_layers):
        hidden_size, num_layers = _target_dims(config)
    aux_ids = config.precompute.aux_layer_ids or default_aux_layer_ids(num_layers)
    plan = StoragePlan(num_samples, num_tokens, hidden_size, len(aux_ids), config.precompute.shard_tokens,
                       config.precompute.fp8)
    ratios, measured = dict(NOMINAL_CODEC_RATIOS), None
    if cache:
        codec, ratios[codec] = measured_codec_ratio(cache)
        measured = codec

    lines = [
        f"samples                {plan.num_samples:,}",
        f"tokens                 {plan.num_tokens:,}",
        f"hidden size            {plan.hidden_size}  (aux layers {aux_ids} + final layer {num_layers})",
        f"bytes per token (raw)  {plan.raw_bytes_per_token:,}  = 4 (id) + 1 (mask) + "
        + (f"{plan.states_per_token} (fp8) + {4 * (plan.num_aux_layers + 1)} (scales)" if plan.fp8
           else f"2 x {len(aux_ids) + 1} x {hidden_size} (bf16)"),
        f"raw size               {plan.raw_bytes / TB:,.3f} TB",
        f"shards                 {plan.num_shards:,}  ({plan.shard_tokens:,} tokens, "
        f"{plan.shard_tokens * plan.raw_bytes_per_token / GB:.2f} GB raw each)",
        "",
        f"{'codec':<12}{'ratio':>8}{'on disk TB':>14}{'write GB/s':>12}{'read GB/s':>12}",
    ]
    for codec, ratio in ratios.items():
        note = " (measured)" if codec == measured else " (nominal)"
        lines.append(
            f"{codec:<12}{ratio:>8.2f}{plan.bytes_on_disk(ratio) / TB:>14,.3f}"
            f"{plan.rate_bytes_per_s(precompute_tokens_per_s, ratio) / GB:>12.3f}"
            f"{plan.rate_bytes_per_s(train_tokens_per_s, ratio) / GB:>12.3f}{note}"
        )
    lines.append(f"write rate at {precompute_tokens_per_s:,.0f} tokens/s of precompute, "
                 f"read rate at {train_tokens_per_s:,.0f} tokens/s of training")
    print("\n".join(lines))

    if output:
        needed = plan.bytes_on_disk(ratios[config.precompute.codec])
        probe = Path(output)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed > free:
            print(f"warning: the cache needs {needed / TB:,.3f} TB with codec {config.precompute.codec} "
                  f"but {probe} has {free / TB:,.3f} TB free")
    return 0
