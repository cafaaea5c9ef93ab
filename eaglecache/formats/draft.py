"""The draft format (docs/formats.md section 4): architecture, tensor names, initial weights, draft directory.

What training writes to ``final/`` and export turns into vLLM's directory share one
description, here: ``DraftArch`` (``final/draft.json``), the tensor names vLLM 0.32's
``LlamaForCausalLMEagle3`` loads (before its qkv / gate_up stacking, no ``model.``
prefix) with their shapes, and the HF-Llama initialisation rule both the trainer and
the untrained baseline draft use. Nothing here builds a module: train/draft.py makes
the ``nn.Module`` from ``DraftArch`` and names its parameters after ``tensor_shapes``.

The exported draft directory (``eaglecache.export`` v1, written by serve/export.py, read by
bench and serve): config.json (vLLM's), model.safetensors, export.json (provenance), README.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from eaglecache.errors import UserError

# the metadata "format" of final/model.safetensors
FORMAT = "eaglecache.draft"
# the exported draft directory
EXPORT_FORMAT, EXPORT_VERSION = "eaglecache.export", 1
CONFIG_JSON, WEIGHTS, EXPORT_JSON, MODEL_CARD = "config.json", "model.safetensors", "export.json", "README.md"
ARCHITECTURE = "LlamaForCausalLMEagle3"
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")

FC = "fc.weight"
# The one decoder layer, in vLLM's checkpoint names.
LAYER_TENSORS = (
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
)
REQUIRED_TENSORS = (FC,) + LAYER_TENSORS
# The decoder layers after the first (a draft of num_layers > 1), ``layers.{i}.`` + these names, i >= 1:
# vLLM 0.32's llama_eagle3 builds them as plain Llama layers whose q/k/v read the hidden size only
# (layer 0, the midlayer, reads [embedding, state]); their unused hidden_norm is not stored.
EXTRA_LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
OUTPUT_NORM = "norm.weight"
# EAGLE 3.1 only: one RMSNorm over the concatenated aux states (vLLM's norm_before_fc), or one per aux
# state (vLLM's fc_norm, ``fc_norm.{i}.weight``)
INPUT_NORM, FC_NORM = "input_norm.weight", "fc_norm.{}.weight"
# P-EAGLE only: the learned state of the parallel slots, in pre-fc aux space [1, num_aux x target hidden]
MASK_HIDDEN = "mask_hidden"
# the draft families: the first three are vLLM's LlamaForCausalLMEagle3, DFlash its own block model
FAMILIES = ("eagle3", "eagle3.1", "peagle", "dflash")
DFLASH_ARCHITECTURE = "DFlashDraftModel"  # vLLM 0.32: qwen3_dflash.DFlashQwen3ForCausalLM, method "dflash"
# DFlash: the context states' norm (after fc) and each layer's tensors, ``layers.{i}.`` + these names
DFLASH_HIDDEN_NORM = "hidden_norm.weight"
DFLASH_LAYER_TENSORS = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
# A reduced vocabulary only: its own LM head rows and the draft-to-target / target-to-draft id maps.
LM_HEAD, D2T, T2D = "lm_head.weight", "d2t", "t2d"
# What a full-vocab draft shares with the target and an export leaves out.
SHARED_WITH_TARGET = (LM_HEAD, D2T, T2D, "embed_tokens.weight")


@dataclass
class DraftArch:
    """The draft's architecture; written to final/draft.json, read back by export."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    target_num_hidden_layers: int
    aux_layer_ids: list[int]
    max_position_embeddings: int
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rope: dict[str, Any] = field(default_factory=dict)  # the target's RoPE keys, copied verbatim
    # the family's variations of the EAGLE3 layer (a draft.json without them is an EAGLE3 draft):
    family: str = "eagle3"
    aux_norm: str = "none"  # "none" | "joint" (one RMSNorm over the aux concat) | "per_layer" (one per aux state)
    norm_output: bool = False  # the next step reads the post-norm state (EAGLE 3.1), not the pre-norm one
    mask_token_id: Optional[int] = None  # P-EAGLE and DFlash: the token id of the parallel slots
    num_layers: int = 1  # decoder layers (the EAGLE families: the midlayer, then layers.1.., each a Llama layer)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("rope"))  # RoPE keys at the top level, as in an HF config
        if self.family == "eagle3":  # an EAGLE3 draft.json stays what releases before the families wrote
            for key in ("family", "aux_norm", "norm_output", "mask_token_id"):
                out.pop(key)
            if self.num_layers == 1:
                out.pop("num_layers")
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> "DraftArch":
        """The inverse of ``to_json``; keys it does not know (``provenance``) are left out."""
        names = {f.name for f in fields(cls)} - {"rope"}
        return cls(**{k: v for k, v in doc.items() if k in names},
                   rope={k: doc[k] for k in ROPE_KEYS if doc.get(k) is not None})

    @classmethod
    def from_target(cls, target: Mapping[str, Any], aux_layer_ids: list[int], draft_vocab_size: Optional[int] = None,
                    intermediate_size: Optional[int] = None, num_attention_heads: Optional[int] = None,
                    num_key_value_heads: Optional[int] = None) -> "DraftArch":
        """A one-layer draft with the target's dimensions (its text model's, for a VL target); null sizes
        are the target's."""
        hidden, heads = target["hidden_size"], target["num_attention_heads"]
        return cls(
            hidden_size=hidden,
            intermediate_size=intermediate_size or target["intermediate_size"],
            num_attention_heads=num_attention_heads or heads,
            num_key_value_heads=num_key_value_heads or target.get("num_key_value_heads") or heads,
            head_dim=target.get("head_dim") or hidden // heads,
            rms_norm_eps=float(target.get("rms_norm_eps", 1e-6)),
            vocab_size=target["vocab_size"],
            draft_vocab_size=draft_vocab_size or target["vocab_size"],
            target_hidden_size=hidden,
            target_num_hidden_layers=target["num_hidden_layers"],
            aux_layer_ids=list(aux_layer_ids),
            max_position_embeddings=target.get("max_position_embeddings", 4096),
            hidden_act=target.get("hidden_act", "silu"),
            initializer_range=target.get("initializer_range", 0.02),
            rope={k: target[k] for k in ROPE_KEYS if target.get(k) is not None},
        )

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    @property
    def parallel(self) -> bool:
        """P-EAGLE: steps 1.. read the mask token and ``mask_hidden`` instead of the carried state."""
        return self.mask_token_id is not None and self.family != "dflash"

    @property
    def aux_width(self) -> int:
        return self.target_hidden_size * len(self.aux_layer_ids)


def _config_id(target: Mapping[str, Any], key: str) -> Optional[int]:
    value = target.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def default_mask_token_id(target: Mapping[str, Any], family: str = "peagle", embedding=None) -> int:
    """The token of the parallel slots when none is configured.

    P-EAGLE: the target's pad token, else its end-of-sequence token, else 0; any fixed id works, since the
    slots learn ``mask_hidden`` and the frozen embedding of that token only has to be the same in training
    and serving. DFlash embeds its mask slots with that embedding alone, so the row must carry a signal: a
    pad row is zero in transformers' init (``padding_idx``) and never trained, which gives every slot the
    same zero input. For DFlash the choice is the first of the target's mask, beginning-of-sequence,
    end-of-sequence and pad tokens whose row of ``embedding`` (the target's, [vocab, hidden]) is not zero."""
    if family != "dflash":
        for key in ("pad_token_id", "eos_token_id"):
            if _config_id(target, key) is not None:
                return _config_id(target, key)
        return 0
    candidates = [_config_id(target, key) for key in ("mask_token_id", "bos_token_id", "eos_token_id", "pad_token_id")]
    candidates = [c for c in candidates if c is not None] + [0]
    if embedding is None:
        return candidates[0]
    return next((c for c in candidates if not embedding_row_is_zero(embedding, c)), candidates[0])


def embedding_row_is_zero(embedding, token_id: int) -> bool:
    """True when ``token_id``'s embedding row is (near) zero next to a typical row: a padding row. The typical
    norm is the median of about 1,024 evenly spaced rows (a 200k x 6k embedding is never copied whole)."""
    sample = embedding[:: max(1, embedding.shape[0] // 1024)].float().norm(dim=-1)
    return bool(embedding[token_id].float().norm() <= 1e-3 * float(sample.median()))


# the aux normalization each family has when the config leaves it open: EAGLE 3.1's paper normalizes each
# captured state (vLLM's fc_norm); P-EAGLE's authors' recipe trains without (speculators normalizes: set it)
DEFAULT_AUX_NORM = {"eagle3": "none", "eagle3.1": "per_layer", "peagle": "none", "dflash": "none"}
AUX_NORMS = {"eagle3": ("none",), "eagle3.1": ("joint", "per_layer"), "peagle": ("none", "per_layer"),
             "dflash": ("none",)}


def resolve_aux_norm(family: str, aux_norm: Optional[str]) -> str:
    """``aux_norm`` as given, or the family's default; ValueError for one the family has no place for."""
    resolved = DEFAULT_AUX_NORM[family] if aux_norm is None else aux_norm
    if resolved not in AUX_NORMS[family]:
        raise ValueError(f"aux_norm {resolved!r} does not apply to the {family} family (it takes: "
                         f"{', '.join(AUX_NORMS[family])})")
    return resolved


def family_arch(family: str, aux_norm: Optional[str] = None, mask_token_id: Optional[int] = None,
                num_layers: int = 1) -> dict[str, Any]:
    """The DraftArch fields a family sets: EAGLE 3.1 normalizes the aux states (``aux_norm``: per_layer, its
    paper's and the default, or joint, vLLM's gpt-oss-style norm_before_fc) and carries the post-norm state;
    P-EAGLE drafts its steps 1.. in parallel from ``mask_token_id`` (per-layer aux norms optional, applied to
    its mask state too, as vLLM does); DFlash drafts a block of mask tokens; EAGLE3 is the plain layer. Every family
    may have ``num_layers`` decoder layers."""
    if family not in FAMILIES:
        raise ValueError(f"unknown draft family {family!r} (known: {', '.join(FAMILIES)})")
    if family in ("peagle", "dflash") and mask_token_id is None:
        raise ValueError(f"a {family} draft needs a mask token id")
    base = {"family": family, "aux_norm": resolve_aux_norm(family, aux_norm), "norm_output": False,
            "mask_token_id": None, "num_layers": int(num_layers)}
    if family == "eagle3.1":
        return base | {"norm_output": True}
    if family in ("peagle", "dflash"):
        return base | {"mask_token_id": int(mask_token_id)}
    return base


def tensor_shapes(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """Every trainable tensor of the draft and its shape, in the order the initialisation draws them.

    q/k/v read ``[input_layernorm(embed), hidden_norm(h)]`` (2 x hidden inputs); ``lm_head`` exists
    for a reduced vocabulary only."""
    if arch.family == "dflash":
        return _dflash_tensor_shapes(arch)
    hidden, inter = arch.hidden_size, arch.intermediate_size
    q_out, kv_out = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if arch.aux_norm == "joint":
        shapes[INPUT_NORM] = (arch.aux_width,)
    elif arch.aux_norm == "per_layer":
        shapes.update({FC_NORM.format(i): (arch.target_hidden_size,) for i in range(len(arch.aux_layer_ids))})
    shapes.update({
        FC: (hidden, arch.aux_width),
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (q_out, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv_out, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv_out, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, q_out),
        "midlayer.post_attention_layernorm.weight": (hidden,),
        "midlayer.mlp.gate_proj.weight": (inter, hidden),
        "midlayer.mlp.up_proj.weight": (inter, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, inter),
    })
    extra_layer = dict(zip(EXTRA_LAYER_TENSORS, [(hidden,), (q_out, hidden), (kv_out, hidden), (kv_out, hidden),
                                                 (hidden, q_out), (hidden,), (inter, hidden), (inter, hidden),
                                                 (hidden, inter)]))
    for i in range(1, arch.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in extra_layer.items()})
    shapes[OUTPUT_NORM] = (hidden,)
    if arch.reduced_vocab:
        shapes[LM_HEAD] = (arch.draft_vocab_size, hidden)
    if arch.parallel:  # last, so the tensors before it draw the same numbers in every family
        shapes[MASK_HIDDEN] = (1, arch.aux_width)
    return shapes


def _dflash_tensor_shapes(arch: DraftArch) -> dict[str, tuple[int, ...]]:
    """DFlash's tensors in vLLM's names (no ``model.`` prefix): fc and the context norm, then per layer a
    Qwen3 decoder layer (q/k/v read the hidden size; per-head q/k norms), then the output norm."""
    hidden, inter, head_dim = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    layer = dict(zip(DFLASH_LAYER_TENSORS, [
        (hidden,), (q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out), (head_dim,), (head_dim,),
        (hidden,), (inter, hidden), (inter, hidden), (hidden, inter)]))
    shapes: dict[str, tuple[int, ...]] = {FC: (hidden, arch.aux_width), DFLASH_HIDDEN_NORM: (hidden,)}
    for i in range(arch.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes[OUTPUT_NORM] = (hidden,)
    if arch.reduced_vocab:
        shapes[LM_HEAD] = (arch.draft_vocab_size, hidden)
    return shapes


def initial_tensors(arch: DraftArch, seed: int) -> dict[str, torch.Tensor]:
    """HF Llama's init from one generator seeded ``seed``: N(0, initializer_range) matrices drawn in
    ``tensor_shapes`` order, unit RMSNorm weights. The trainer then starts the output norm and a reduced
    LM head from the target's (train/draft.py); the untrained baseline keeps these."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in tensor_shapes(arch).items():
        if len(shape) == 2:
            out[name] = torch.randn(shape, generator=generator) * arch.initializer_range
        else:
            out[name] = torch.ones(shape)
    return out


def served_aux_layer_ids(config: Mapping[str, Any]) -> list[int]:
    """The target layers (vLLM's aux ids: outputs after k layers) an exported draft's config.json reads:
    EAGLE's ``eagle_aux_hidden_state_layer_ids``, or DFlash's ``dflash_config.target_layer_ids``, which
    count HF-style from the first layer's output (vLLM adds 1)."""
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return [int(i) for i in config["eagle_aux_hidden_state_layer_ids"]]
    return [int(i) + 1 for i in (config.get("dflash_config") or {}).get("target_layer_ids") or []]


def vllm_method(config: Mapping[str, Any]) -> dict[str, Any]:
    """The speculative-config keys an exported draft's config.json asks vLLM 0.32 for: ``method`` (``dflash``
    for a DFlash draft, else ``eagle3``) and, for P-EAGLE (a ``mask_token_id``), ``parallel_drafting``
    (vLLM turns it on by itself for dflash)."""
    dflash = DFLASH_ARCHITECTURE in (config.get("architectures") or [])
    keys: dict[str, Any] = {"method": "dflash" if dflash else "eagle3"}
    if config.get("mask_token_id") is not None and not dflash:
        keys["parallel_drafting"] = True
    return keys


def read_draft_dir(draft_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, export.json) of an exported draft directory, with one-line errors for anything else
    (export.json is {} for a draft exported by another tool)."""
    draft_dir = Path(draft_dir)
    if not (draft_dir / CONFIG_JSON).is_file() or not (draft_dir / WEIGHTS).is_file():
        raise UserError(f"{draft_dir} is not a draft directory (needs {CONFIG_JSON} and {WEIGHTS})")
    config = json.loads((draft_dir / CONFIG_JSON).read_text())
    if not {ARCHITECTURE, DFLASH_ARCHITECTURE} & set(config.get("architectures") or []):
        raise UserError(f"{draft_dir}/{CONFIG_JSON} is not an EAGLE3 or DFlash draft "
                        f"(architectures {config.get('architectures')})")
    meta_path = draft_dir / EXPORT_JSON
    return config, (json.loads(meta_path.read_text()) if meta_path.is_file() else {})
