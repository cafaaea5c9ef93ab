"""Export: a training run's draft weights -> the directory vLLM 0.32 loads as an EAGLE3 draft.

The output is what `--speculative-config '{"method": "eagle3", "model": DIR, ...}'` reads:
config.json (`LlamaForCausalLMEagle3`, one layer, RoPE copied from the target, aux layer ids at
the top level and in `eagle_config`), model.safetensors in bf16 with vLLM's tensor names and no
`model.` prefix, README.md (the model card) and export.json (provenance). What the draft shares
with the target stays out: `embed_tokens` always, `lm_head` for a full-vocab draft. `d2t`/`t2d`
go in only for a reduced vocab: vLLM 0.32 refuses a full-vocab draft that carries `d2t`.

Also here: `build_untrained_draft`, a randomly initialised draft for a target, which tests and
`eaglecache bench --untrained-baseline` use as the "no training" reference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from eaglecache.errors import UserError
from eaglecache.serve.card import render_model_card
from eaglecache.target import default_aux_layer_ids, file_sha256, read_head_tensors, target_config
from eaglecache.train.draft import ROPE_KEYS, DraftArch

log = logging.getLogger(__name__)

EXPORT_FORMAT, EXPORT_VERSION = "eaglecache.export", 1
# Tensors of the one decoder layer, in vLLM's checkpoint names (before its qkv/gate_up stacking).
LAYER_TENSORS = (
    "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
)
REQUIRED_TENSORS = ("fc.weight",) + LAYER_TENSORS


# ---------------------------------------------------------------- target reading
def draft_architecture(target_dir: str | Path, aux_layer_ids: list[int] | None = None,
                       draft_vocab_size: int | None = None) -> dict[str, Any]:
    """The draft.json-style architecture of a one-layer draft with the target's own dimensions
    (the text model's config of a VL target), as training writes it."""
    t = target_config(target_dir)
    aux_layer_ids = list(aux_layer_ids or default_aux_layer_ids(t["num_hidden_layers"]))
    return DraftArch.from_target(t, aux_layer_ids, draft_vocab_size).to_json()


# ---------------------------------------------------------------- the vLLM config
def _arch_value(arch: Mapping[str, Any], *names: str, default: Any = KeyError) -> Any:
    for name in names:
        if arch.get(name) is not None:
            return arch[name]
    if default is KeyError:
        raise UserError(f"draft.json has no {names[0]!r}")
    return default


def vllm_draft_config(arch: Mapping[str, Any], max_model_len: int | None = None) -> dict[str, Any]:
    """config.json of the draft as vLLM's `LlamaForCausalLMEagle3` reads it."""
    aux_ids = [int(i) for i in _arch_value(arch, "aux_layer_ids", "eagle_aux_hidden_state_layer_ids")]
    hidden = int(_arch_value(arch, "hidden_size"))
    heads = int(_arch_value(arch, "num_attention_heads"))
    vocab = int(_arch_value(arch, "vocab_size"))
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_arch_value(arch, "intermediate_size")),
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_arch_value(arch, "num_key_value_heads", default=heads)),
        "head_dim": int(_arch_value(arch, "head_dim", default=hidden // heads)),
        "hidden_act": _arch_value(arch, "hidden_act", default="silu"),
        "rms_norm_eps": float(_arch_value(arch, "rms_norm_eps")),
        "vocab_size": vocab,
        "draft_vocab_size": int(_arch_value(arch, "draft_vocab_size", default=vocab)),
        "target_hidden_size": int(_arch_value(arch, "target_hidden_size", default=hidden)),
        # vLLM refuses a draft whose context is shorter than the engine's.
        "max_position_embeddings": max(int(_arch_value(arch, "max_position_embeddings", default=0)),
                                       int(max_model_len or 0)) or 4096,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "eagle_aux_hidden_state_layer_ids": aux_ids,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": aux_ids},
    }
    config.update({k: arch[k] for k in ROPE_KEYS if arch.get(k) is not None})
    return config


# ---------------------------------------------------------------- tensors
def select_draft_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         target_norm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors vLLM should load, in bf16 (d2t int64, t2d bool), checked against the config."""
    names = {name.removeprefix("model."): t for name, t in tensors.items()}
    missing = [n for n in REQUIRED_TENSORS if n not in names]
    if missing:
        raise UserError(f"draft weights lack {', '.join(missing)}")
    hidden, vocab, draft_vocab = config["hidden_size"], config["vocab_size"], config["draft_vocab_size"]
    aux_width = config["target_hidden_size"] * len(config["eagle_aux_hidden_state_layer_ids"])
    if tuple(names["fc.weight"].shape) != (hidden, aux_width):
        raise UserError(f"fc.weight has shape {tuple(names['fc.weight'].shape)}, expected {(hidden, aux_width)}")
    out = {n: names[n].to(torch.bfloat16).contiguous() for n in REQUIRED_TENSORS}
    norm = names.get("norm.weight", target_norm)
    if norm is None:
        raise UserError("draft weights lack norm.weight and no target norm was given")
    out["norm.weight"] = norm.to(torch.bfloat16).contiguous()
    if draft_vocab < vocab:
        for name in ("lm_head.weight", "d2t"):
            if name not in names:
                raise UserError(f"reduced-vocab draft ({draft_vocab} < {vocab}) lacks {name}")
        if tuple(names["lm_head.weight"].shape) != (draft_vocab, hidden):
            raise UserError(f"lm_head.weight has shape {tuple(names['lm_head.weight'].shape)}, "
                            f"expected {(draft_vocab, hidden)}")
        d2t = names["d2t"].to(torch.int64)
        if d2t.shape != (draft_vocab,) or int((torch.arange(draft_vocab) + d2t).max()) >= vocab:
            raise UserError(f"d2t does not map {draft_vocab} draft ids into the target vocab of {vocab}")
        out["lm_head.weight"] = names["lm_head.weight"].to(torch.bfloat16).contiguous()
        out["d2t"] = d2t.contiguous()
        if "t2d" in names:
            out["t2d"] = names["t2d"].to(torch.bool).contiguous()
    else:
        dropped = [n for n in ("lm_head.weight", "d2t", "t2d", "embed_tokens.weight") if n in names]
        if dropped:
            log.info("full-vocab draft: leaving out %s (shared with the target)", ", ".join(dropped))
    return out


def random_draft_tensors(arch: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Untrained draft weights: N(0, initializer_range) matrices, unit norms, as HF Llama inits."""
    config = vllm_draft_config(arch)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    aux_width = config["target_hidden_size"] * len(config["eagle_aux_hidden_state_layer_ids"])
    shapes = {
        "fc.weight": (hidden, aux_width),
        "midlayer.self_attn.q_proj.weight": (q_out, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv_out, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv_out, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, q_out),
        "midlayer.mlp.gate_proj.weight": (inter, hidden),
        "midlayer.mlp.up_proj.weight": (inter, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, inter),
    }
    std = float(arch.get("initializer_range", 0.02))
    tensors = {name: torch.randn(shape, generator=generator) * std for name, shape in sorted(shapes.items())}
    for name in ("midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                 "midlayer.post_attention_layernorm.weight", "norm.weight"):
        tensors[name] = torch.ones(hidden)
    draft_vocab, vocab = config["draft_vocab_size"], config["vocab_size"]
    if draft_vocab < vocab:  # a reduced vocab of the first draft_vocab target ids
        tensors["lm_head.weight"] = torch.randn((draft_vocab, hidden), generator=generator) * std
        tensors["d2t"] = torch.zeros(draft_vocab, dtype=torch.int64)
        tensors["t2d"] = torch.arange(vocab) < draft_vocab
    return tensors


# ---------------------------------------------------------------- writing
def replace_dir(tmp: Path, output: Path) -> None:
    """Move a finished directory into place; an existing output must be an earlier export."""
    if output.exists():
        if not (output / "export.json").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{output} exists and is not an eaglecache export; refusing to replace it")
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


def write_draft_dir(output: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    provenance: dict[str, Any], training: dict[str, Any] | None = None) -> Path:
    """Write config.json, model.safetensors, README.md and export.json atomically."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        provenance = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **provenance,
                      "weights_sha256": file_sha256(tmp / "model.safetensors"),
                      "num_parameters": sum(t.numel() for n, t in tensors.items() if t.is_floating_point()),
                      "training": training}
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(render_model_card(config, provenance, training, results=None))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, output)
    return output


def read_export(draft_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, export.json) of a draft directory, with clear errors for anything else."""
    draft_dir = Path(draft_dir)
    if not (draft_dir / "config.json").is_file() or not (draft_dir / "model.safetensors").is_file():
        raise UserError(f"{draft_dir} is not a draft directory (needs config.json and model.safetensors)")
    config = json.loads((draft_dir / "config.json").read_text())
    if "LlamaForCausalLMEagle3" not in config.get("architectures", []):
        raise UserError(f"{draft_dir}/config.json is not an EAGLE3 draft (architectures {config.get('architectures')})")
    meta_path = draft_dir / "export.json"
    return config, (json.loads(meta_path.read_text()) if meta_path.is_file() else {})


# ---------------------------------------------------------------- entry points
def _load_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, Any]]:
    final = run_dir / "final"
    weights, arch_path = final / "model.safetensors", final / "draft.json"
    if not weights.is_file() or not arch_path.is_file():
        raise UserError(f"{run_dir} is not a finished training run (needs final/model.safetensors and final/draft.json)")
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    arch = json.loads(arch_path.read_text())
    config_path = run_dir / "config.yaml"
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    run_path = run_dir / "run.json"
    run_info = json.loads(run_path.read_text()) if run_path.is_file() else {}
    return tensors, arch, run_config or {}, run_info


def training_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (train/metrics.py), oldest first; [] when there are none."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def training_summary(run_config: Mapping[str, Any], run_info: Mapping[str, Any],
                     last_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the model card says about training: settings from config.yaml, size from run.json, end metrics."""
    train, data = run_config.get("train", {}) or {}, run_config.get("data", {}) or {}
    keys = ("ttt_length", "ttt_decay", "lr", "warmup_ratio", "min_lr_ratio", "max_grad_norm", "dtype",
            "gradient_checkpointing", "global_batch_size", "micro_batch_size", "epochs", "max_steps", "seed")
    summary = {k: train[k] for k in keys if train.get(k) is not None}
    summary["max_seq_length"] = train.get("max_seq_length") or data.get("max_seq_length")
    summary["world_size"] = run_info.get("world_size")
    summary["optimizer_steps"] = run_info.get("total_steps")
    summary["training_samples"] = (run_info.get("source") or {}).get("num_samples")
    summary["dataset_hash"] = (run_info.get("source") or {}).get("dataset_hash")
    if last_metrics:
        summary["final_loss"] = last_metrics.get("loss")
        summary["final_simulated_accept_length_3"] = last_metrics.get("accept_len_3")
    return {k: v for k, v in summary.items() if v is not None}


def export_run(run_dir: str | Path, output: str | Path, target_dir: str | Path | None = None,
               weights_prefix: str = "", max_model_len: int | None = None) -> Path:
    """Export RUN_DIR/final to a vLLM draft directory; returns the output path."""
    run_dir = Path(run_dir)
    if run_dir.name == "final" and (run_dir / "draft.json").is_file():
        run_dir = run_dir.parent
    tensors, arch, run_config, run_info = _load_run(run_dir)
    config = vllm_draft_config(arch, max_model_len)
    target_norm = None
    if not any(n.removeprefix("model.") == "norm.weight" for n in tensors):
        # The draft shares the target's final norm (frozen), so the run may not have saved it.
        if target_dir is None:
            raise UserError(f"{run_dir}/final has no norm.weight and the target is unknown")
        target_norm = read_head_tensors(target_dir, weights_prefix, ("norm",))["norm"]
    selected = select_draft_tensors(tensors, config, target_norm)
    provenance = {
        "source": "training run", "run_dir": str(run_dir.resolve()),
        "run_weights_sha256": file_sha256(run_dir / "final" / "model.safetensors"),
        "draft_json": arch,
        "target_path": str(target_dir) if target_dir else (run_config.get("target") or {}).get("path") or "tiny target",
        "run": run_info, "run_config": run_config,
    }
    summary = training_summary(run_config, run_info, (training_metrics(run_dir) or [{}])[-1])
    return write_draft_dir(output, config, selected, provenance, summary)


def build_untrained_draft(target_dir: str | Path, output: str | Path, seed: int = 0,
                          aux_layer_ids: list[int] | None = None, max_model_len: int | None = None,
                          draft_vocab_size: int | None = None) -> Path:
    """A randomly initialised one-layer draft for `target_dir`, exported like a trained one."""
    arch = draft_architecture(target_dir, aux_layer_ids, draft_vocab_size)
    config = vllm_draft_config(arch, max_model_len)
    tensors = select_draft_tensors(random_draft_tensors(arch, seed), config)
    provenance = {"source": "untrained (random init)", "seed": seed, "target_path": str(Path(target_dir).resolve()),
                  "target_config_sha256": file_sha256(Path(target_dir) / "config.json"), "draft_json": arch}
    return write_draft_dir(output, config, tensors, provenance, training=None)


def resolve_target_dir(config) -> Path:
    """The target directory the config names (the embedded tiny target when target.path is null)."""
    from eaglecache.target import resolve_target

    return Path(resolve_target(config))


def run_export(config, args) -> int:
    run_dir = Path(args.checkpoint)
    if not run_dir.is_dir():
        raise UserError(f"checkpoint directory not found: {run_dir}")
    # The target is only read when the run left out the (shared, frozen) final norm.
    target_dir = resolve_target_dir(config) if _lacks_norm(run_dir) else None
    output = export_run(run_dir, args.output, target_dir, config.target.weights_prefix, config.target.max_model_len)
    exported = json.loads((output / "export.json").read_text())
    size_mib = (output / "model.safetensors").stat().st_size / 2**20
    spec = {"method": "eagle3", "model": str(output), "num_speculative_tokens": config.serve.num_speculative_tokens}
    print(f"exported {run_dir} -> {output} ({exported['num_parameters']:,} parameters, {size_mib:.1f} MiB bf16)")
    print(f"load it with --speculative-config '{json.dumps(spec)}'")
    return 0


def _lacks_norm(run_dir: Path) -> bool:
    weights = run_dir / "final" / "model.safetensors"
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as f:
        return not any(n.removeprefix("model.") == "norm.weight" for n in f.keys())
