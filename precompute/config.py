"""Config of the precompute stage: the vLLM engine, which layers to dump, the store codec."""

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from eaglecache.flags import warn_deprecated
from eaglecache.section import Section, strictly_ascending

# keys of earlier releases, where "shard" also meant a job's part: still read, with one deprecation line
RENAMED_KEYS = {"num_shards": "num_parts", "shard_index": "part_index"}


class PrecomputeConfig(Section):
    tensor_parallel_size: Optional[int] = Field(None, ge=1, description="vLLM tensor parallel size for precompute; null uses target.tensor_parallel_size.")
    aux_layer_ids: Optional[list[int]] = Field(
        None, description="Target layer ids whose outputs feed the draft; null uses vLLM's (2, L//2, L-3)."
    )
    batch_size: int = Field(64, ge=1, description="Samples kept in flight in vLLM at once (requests).")
    max_pending_gib: int = Field(
        4, ge=1, description="GiB of extracted states that may wait for the writer before the engine is held back."
    )
    shard_tokens: int = Field(
        65536, ge=1, description="Target tokens per shard; a shard is written once, as a unit. The writer holds two "
        "shards of states in host memory (one filling, one being written): 2 x tokens x (aux + 1) x hidden x 2 bytes."
    )
    chunk_tokens: Optional[int] = Field(
        None, ge=1, description="Tokens per Zarr inner chunk (the decode unit; each sample starts one). null: the power "
        "of two holding ~256 KiB of aux states, 16-1024 (hidden 256: 256; hidden 6144: 16).")
    codec: Literal["none", "zstd", "blosc-zstd"] = Field("zstd", description="Lossless compression codec.")
    codec_level: int = Field(1, ge=0, le=22, description="Compression level of the codec.")
    fp8: bool = Field(
        False, description="Lossy: store states as FP8 e4m3 with a per-token scale (breaks bit-equivalence)."
    )
    num_parts: int = Field(1, ge=1, description="Number of independent precompute jobs the data set is split into, "
                           "one part of the cache each.")
    part_index: int = Field(0, ge=0, description="Which of the num_parts parts this job writes.")

    # the writer's parallelism and memory, and which part a job writes, never change a stored value (the
    # resolved tensor parallel size and the number of parts are recorded at the top of the cache metadata)
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ("tensor_parallel_size", "batch_size", "max_pending_gib",
                                               "num_parts", "part_index")

    _aux_order = field_validator("aux_layer_ids")(strictly_ascending)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(old in data for old in RENAMED_KEYS):
            return data
        data = dict(data)
        for old, new in RENAMED_KEYS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"precompute.{old} and precompute.{new} are the same setting: give {new} only")
                warn_deprecated(f"precompute.{old}", f"precompute.{new}")
                data[new] = data.pop(old)
        return data
