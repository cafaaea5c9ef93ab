"""The typed configuration schema, YAML loading and dotted command-line overrides.

Every stage declares its own section (``data/config.py``, ``precompute/config.py``,
``train/config.py``, ``serve/config.py``); this module composes them with the
``target`` section they all share. A config file is YAML; overrides are
``section.key=value`` strings whose values are parsed as YAML scalars. Unknown
keys, wrong types and missing files raise ``UserError`` naming the key or path.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from eaglecache.data.config import DataConfig
from eaglecache.errors import UserError
from eaglecache.section import Section
from eaglecache.precompute.config import PrecomputeConfig
from eaglecache.serve.config import ServeConfig
from eaglecache.train.config import PARALLEL_FAMILIES, SEQUENTIAL_TTT_LENGTH, TrainConfig

class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML reads ``1e-4`` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d+\.\d*|\.\d+)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


# The configs ship in the package as eaglecache.configs (the repository's configs/ in a checkout), so
# commands find them from any directory after a plain `pip install`.
CONFIGS_DIR = Path(str(importlib.resources.files("eaglecache.configs")))
PACKAGED_CONFIGS = {"tiny": CONFIGS_DIR / "tiny.yaml", "minimax_m3": CONFIGS_DIR / "minimax_m3" / "config.yaml"}
DEFAULT_CONFIG = PACKAGED_CONFIGS["tiny"]


def resolve_config_path(path: str | Path | None) -> Path:
    """A config file: an existing path, else a packaged config's name (``tiny``, ``minimax_m3``), else an error."""
    if path is None:
        return DEFAULT_CONFIG
    given = Path(path)
    if given.is_file():
        return given
    packaged = PACKAGED_CONFIGS.get(str(path).removesuffix(".yaml"))
    if packaged is not None:
        return packaged
    raise UserError(f"config file not found: {path} (packaged configs: {', '.join(PACKAGED_CONFIGS)})")


class TargetConfig(Section):
    path: Optional[str] = Field(
        None, description="HF-format target directory; null builds and uses the embedded tiny target."
    )
    weights_prefix: str = Field(
        "", description="Prefix of the text model's tensors in the checkpoint, e.g. 'language_model.' for MiniMax-M3."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the target computes in (vLLM and transformers); auto: bfloat16 on CUDA and on "
        "CPUs with native bf16 (AVX512_BF16 or AMX), float32 on other CPUs. The cache stores bf16 either way."
    )
    max_model_len: Optional[int] = Field(
        None, description="Context length given to vLLM; null uses data.max_seq_length."
    )
    # how vLLM runs the target, the same for every stage that starts it (regenerate, precompute, bench, serve)
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallel size of the target (GPUs per engine); a stage may override it."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vLLM memory fraction (of host RAM on CPU builds)."
    )
    kv_cache_gib: Optional[float] = Field(
        None, gt=0.0, description="vLLM KV cache size in GiB; set, it replaces gpu_memory_utilization's sizing "
        "(on CPU builds vLLM subtracts its own resident memory from that fraction, so a fixed size is steadier)."
    )
    enforce_eager: Optional[bool] = Field(
        None, description="vLLM eager mode; null: eager on CPU (compiling there costs more than it saves), "
        "compiled with CUDA graphs on GPU."
    )

    # memory sizing never changes what the target computes: artifacts do not record it
    RUNTIME_ONLY: ClassVar[tuple[str, ...]] = ("gpu_memory_utilization", "kv_cache_gib")
    # how vLLM runs the target (its parallelism, graphs, context limit): part of a cache's identity, since
    # they can change vLLM's numerics, but not of a stage that never starts vLLM (training reads the cache,
    # whose fingerprint pins them, or runs the target in transformers)
    VLLM_ONLY: ClassVar[tuple[str, ...]] = ("tensor_parallel_size", "enforce_eager", "max_model_len")

    def compute_dtype(self, device: Optional[str] = None) -> str:
        """``dtype`` resolved for ``device`` of this machine (CUDA when present, else the CPU)."""
        from eaglecache.dtypes import resolve_dtype

        return resolve_dtype(self.dtype, "target.dtype", device)

    def vllm_engine_args(self, tensor_parallel_size: Optional[int] = None) -> dict[str, Any]:
        """The `vllm.LLM` / `EngineArgs` arguments these settings stand for (a stage's TP size, if it sets one)."""
        import torch

        eager = (not torch.cuda.is_available()) if self.enforce_eager is None else self.enforce_eager
        args = {"dtype": self.compute_dtype(), "tensor_parallel_size": tensor_parallel_size or self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "enforce_eager": eager}
        if self.kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        return args


class Config(Section):
    target: TargetConfig = Field(default_factory=TargetConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    # the settings resolved here from null: with_overrides gives them null again, so that an override of what
    # they follow (a grid's train.draft.family) resolves them anew
    _resolved_from_null: set = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _resolve_ttt_length(self):
        """train.ttt_length null: 7 for sequential families; for the parallel ones the slots vLLM serves. Resolved
        here, once, so every stage (and the resolved config a run writes) sees the number."""
        if self.train.ttt_length is None:
            parallel = self.train.draft.family in PARALLEL_FAMILIES
            self.train.ttt_length = self.serve.num_speculative_tokens if parallel else SEQUENTIAL_TTT_LENGTH
            self._resolved_from_null.add(("train", "ttt_length"))
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def identity(self, *sections: str, vllm: bool = True) -> dict[str, Any]:
        """The named sections (all when none) without their runtime-only settings (eaglecache/section.py);
        ``vllm=False`` for a stage that never starts vLLM also drops the target's ``VLLM_ONLY`` settings."""
        out = {}
        for name in sections or type(self).model_fields:
            section = getattr(self, name)
            out[name] = section.identity(drop=() if vllm or name != "target" else TargetConfig.VLLM_ONLY)
        return out

    def fingerprint(self, *sections: str, vllm: bool = True) -> str:
        """sha256 of ``identity(*sections)``: what an artifact records and a resume or join compares."""
        return hashlib.sha256(json.dumps(self.identity(*sections, vllm=vllm), sort_keys=True).encode()).hexdigest()

    # The "null means X" defaults that depend on another section or on the target, each resolved here once.
    @property
    def train_max_seq_length(self) -> int:
        """train.max_seq_length, null meaning data.max_seq_length."""
        return self.train.max_seq_length or self.data.max_seq_length

    def precompute_aux_layer_ids(self, num_layers: int) -> list[int]:
        """precompute.aux_layer_ids, null meaning vLLM's default (2, L//2, L-3) for a target of ``num_layers``."""
        from eaglecache.target import default_aux_layer_ids

        return list(self.precompute.aux_layer_ids or default_aux_layer_ids(num_layers))

    def draft_aux_layer_ids(self, stored: list[int]) -> list[int]:
        """train.draft.aux_layer_ids, null meaning all the ``stored`` ones (a cache's, or what the online source
        computes); ids not stored are refused in one line naming them."""
        stored = [int(i) for i in stored]
        wanted = list(self.train.draft.aux_layer_ids or stored)
        missing = [i for i in wanted if i not in stored]
        if missing:
            raise UserError(f"train.draft.aux_layer_ids {wanted}: layers {missing} are not in the features (they "
                            f"hold {stored}); compute them into a cache with precompute.aux_layer_ids")
        return wanted


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and parse the value as a YAML scalar or flow list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override {key}: cannot parse value {raw!r} ({exc.__class__.__name__})") from None
    return key.strip(), value


def _format_validation_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    if err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a section's cross-field check
        return f"config section {where or 'top level'}: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        return f"unknown config key: {where}"
    if err["type"] == "missing":
        return f"missing config key: {where}"
    return f"config key {where}: {err['msg']} (got {err.get('input')!r})"


def _validate(tree: dict[str, Any], overrides, where: str) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{where}: {_format_validation_error(exc)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (a file, or a packaged config's name; ``tiny`` when None) and apply overrides."""
    path = resolve_config_path(path)
    try:
        tree = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path}: top level must be a mapping of sections")
    return _validate(_legacy_run_defaults(tree, path), overrides, str(path))


# What a run's config.yaml of an earlier release meant by a setting it did not have yet: that release's
# behaviour, which the setting's default no longer is. Only for a run directory's own config (its run.json
# beside it): a config a user writes gets today's defaults.
LEGACY_RUN_DEFAULTS = {("train", "loss_mask_alignment"): "anchor"}


def _legacy_run_defaults(tree: dict, path: Path) -> dict:
    from eaglecache.formats import run as run_format

    if path.name != run_format.CONFIG or not (path.parent / run_format.RUN_JSON).is_file():
        return tree
    for (section, key), value in LEGACY_RUN_DEFAULTS.items():
        if isinstance(tree.get(section), dict) and key not in tree[section]:
            tree[section][key] = value
    return tree


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``config`` with dotted overrides applied and validated, as if they had been given after its own."""
    tree = config.to_dict()
    for section, key in config._resolved_from_null:
        tree[section][key] = None
    return _validate(tree, overrides, "override")
