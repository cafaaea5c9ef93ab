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
from eaglecache.formats import run as run_format
from eaglecache.formats.draft import (ARCHITECTURE, CONFIG_JSON, D2T, DFLASH_ARCHITECTURE, DFLASH_HIDDEN_NORM,
                                      DFLASH_LAYER_TENSORS, EXPORT_FORMAT, EXPORT_JSON, EXPORT_VERSION,
                                      EXTRA_LAYER_TENSORS, FC, FC_NORM, INPUT_NORM, LM_HEAD, MASK_HIDDEN, MODEL_CARD,
                                      OUTPUT_NORM, REQUIRED_TENSORS, ROPE_KEYS, SHARED_WITH_TARGET, T2D, WEIGHTS,
                                      DraftArch, initial_tensors, served_aux_layer_ids)
from eaglecache.serve.card import render_model_card
from eaglecache.serve.vllm_engine import speculative_config
from eaglecache.target import default_aux_layer_ids, file_sha256, read_head_tensors, target_config

log = logging.getLogger(__name__)



# ---------------------------------------------------------------- target reading
def draft_architecture(target_dir: str | Path, aux_layer_ids: list[int] | None = None,
                       draft_vocab_size: int | None = None, family: str = "eagle3",
                       num_layers: int = 1, aux_norm: str | None = None) -> dict[str, Any]:
    """The draft.json-style architecture of a ``num_layers``-layer draft of ``family`` with the target's own
    dimensions (the text model's config of a VL target), as training writes it."""
    from dataclasses import replace

    from eaglecache.formats.draft import default_mask_token_id, family_arch

    t = target_config(target_dir)
    aux_layer_ids = list(aux_layer_ids or default_aux_layer_ids(t["num_hidden_layers"]))
    arch = DraftArch.from_target(t, aux_layer_ids, draft_vocab_size)
    embedding = read_head_tensors(target_dir, which=("embed",))["embed"] if family == "dflash" else None
    fields = family_arch(family, aux_norm, mask_token_id=default_mask_token_id(t, family, embedding),
                         num_layers=num_layers)
    return replace(arch, **fields).to_json()


# ---------------------------------------------------------------- the vLLM config
def _arch_value(arch: Mapping[str, Any], *names: str, default: Any = KeyError) -> Any:
    for name in names:
        if arch.get(name) is not None:
            return arch[name]
    if default is KeyError:
        raise UserError(f"draft.json has no {names[0]!r}")
    return default


def vllm_draft_config(arch: Mapping[str, Any], max_model_len: int | None = None) -> dict[str, Any]:
    """config.json of the draft as vLLM's `LlamaForCausalLMEagle3` (or, for DFlash, `DFlashDraftModel`) reads it."""
    if arch.get("family") == "dflash":
        return dflash_vllm_config(arch, max_model_len)
    aux_ids = [int(i) for i in _arch_value(arch, "aux_layer_ids", "eagle_aux_hidden_state_layer_ids")]
    hidden = int(_arch_value(arch, "hidden_size"))
    heads = int(_arch_value(arch, "num_attention_heads"))
    vocab = int(_arch_value(arch, "vocab_size"))
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_arch_value(arch, "intermediate_size")),
        "num_hidden_layers": int(arch.get("num_layers") or 1),
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
    config.update(family_config(arch))
    return config


def dflash_vllm_config(arch: Mapping[str, Any], max_model_len: int | None = None) -> dict[str, Any]:
    """config.json of a DFlash draft as vLLM 0.32's `DFlashDraftModel` (qwen3_dflash.py) reads it: a Qwen3
    config of the draft's layers, the target's RoPE, and ``dflash_config`` with the mask token and the aux
    layers as HF-style ids (vLLM's aux id - 1). No ``layer_types``: every layer attends within its block
    both ways, as trained."""
    hidden, heads = int(arch["hidden_size"]), int(arch["num_attention_heads"])
    config = {
        "architectures": [DFLASH_ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": int(arch["intermediate_size"]),
        "num_hidden_layers": int(arch.get("num_layers", 1)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(arch.get("num_key_value_heads") or heads),
        "head_dim": int(arch.get("head_dim") or hidden // heads),
        "hidden_act": arch.get("hidden_act", "silu"),
        "rms_norm_eps": float(arch["rms_norm_eps"]),
        "vocab_size": int(arch["vocab_size"]),
        "draft_vocab_size": int(arch.get("draft_vocab_size") or arch["vocab_size"]),
        "target_hidden_size": int(arch.get("target_hidden_size") or hidden),
        "max_position_embeddings": max(int(arch.get("max_position_embeddings") or 0), int(max_model_len or 0)) or 4096,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dflash_config": {"mask_token_id": int(arch["mask_token_id"]),
                          "target_layer_ids": [int(i) - 1 for i in arch["aux_layer_ids"]]},
    }
    config.update({k: arch[k] for k in ROPE_KEYS if arch.get(k) is not None})
    return config


def family_config(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json keys by which vLLM 0.32's LlamaForCausalLMEagle3 tells the families apart:
    ``norm_before_fc`` (one RMSNorm over the aux concat, ``input_norm.weight``) or ``fc_norm`` (one per aux
    state) and ``norm_output`` (the next step reads the post-norm state) for EAGLE 3.1; ``mask_token_id`` (and
    the ``mask_hidden`` tensor) for P-EAGLE, which vLLM serves with ``parallel_drafting``."""
    out: dict[str, Any] = {}
    if arch.get("aux_norm") == "joint":
        out["norm_before_fc"] = True
    elif arch.get("aux_norm") == "per_layer":
        out["fc_norm"] = True
    if arch.get("norm_output"):
        out["norm_output"] = True
    if arch.get("mask_token_id") is not None:
        out["mask_token_id"] = int(arch["mask_token_id"])
    return out


def family_tensors(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensors a family (and a draft of several layers) adds to REQUIRED_TENSORS, read from the vLLM config."""
    names: tuple[str, ...] = ()
    if config.get("norm_before_fc") or (config.get("eagle_config") or {}).get("norm_before_fc"):
        names += (INPUT_NORM,)
    if config.get("fc_norm"):
        names += tuple(FC_NORM.format(i) for i in range(len(config["eagle_aux_hidden_state_layer_ids"])))
    if config.get("mask_token_id") is not None:
        names += (MASK_HIDDEN,)
    names += tuple(f"layers.{i}.{name}" for i in range(1, int(config.get("num_hidden_layers") or 1))
                   for name in EXTRA_LAYER_TENSORS)
    return names


# ---------------------------------------------------------------- tensors
def select_draft_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         target_norm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors vLLM should load, in bf16 (d2t int64, t2d bool), checked against the config."""
    names = {name.removeprefix("model."): t for name, t in tensors.items()}
    if DFLASH_ARCHITECTURE in config.get("architectures", []):
        required = [FC, DFLASH_HIDDEN_NORM] + [f"layers.{i}.{name}" for i in range(int(config["num_hidden_layers"]))
                                               for name in DFLASH_LAYER_TENSORS]
    else:
        required = list(REQUIRED_TENSORS + family_tensors(config))
    missing = [n for n in required if n not in names]
    if missing:
        raise UserError(f"draft weights lack {', '.join(missing[:5])}")
    hidden, vocab, draft_vocab = config["hidden_size"], config["vocab_size"], config["draft_vocab_size"]
    aux_width = config["target_hidden_size"] * len(served_aux_layer_ids(config))
    if tuple(names[FC].shape) != (hidden, aux_width):
        raise UserError(f"fc.weight has shape {tuple(names['fc.weight'].shape)}, expected {(hidden, aux_width)}")
    out = {n: names[n].to(torch.bfloat16).contiguous() for n in required}
    norm = names.get(OUTPUT_NORM, target_norm)
    if norm is None:
        raise UserError("draft weights lack norm.weight and no target norm was given")
    out[OUTPUT_NORM] = norm.to(torch.bfloat16).contiguous()
    if draft_vocab < vocab:
        for name in (LM_HEAD, D2T):
            if name not in names:
                raise UserError(f"reduced-vocab draft ({draft_vocab} < {vocab}) lacks {name}")
        if tuple(names[LM_HEAD].shape) != (draft_vocab, hidden):
            raise UserError(f"lm_head.weight has shape {tuple(names['lm_head.weight'].shape)}, "
                            f"expected {(draft_vocab, hidden)}")
        d2t = names[D2T].to(torch.int64)
        if d2t.shape != (draft_vocab,) or int((torch.arange(draft_vocab) + d2t).max()) >= vocab:
            raise UserError(f"d2t does not map {draft_vocab} draft ids into the target vocab of {vocab}")
        out[LM_HEAD] = names[LM_HEAD].to(torch.bfloat16).contiguous()
        out[D2T] = d2t.contiguous()
        if T2D in names:
            out[T2D] = names[T2D].to(torch.bool).contiguous()
    else:
        dropped = [n for n in SHARED_WITH_TARGET if n in names]
        if dropped:
            log.info("full-vocab draft: leaving out %s (shared with the target)", ", ".join(dropped))
    return out


def random_draft_tensors(arch: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Untrained draft weights: the draft format's initial tensors (HF Llama init); a reduced vocab maps
    its rows to the first draft_vocab_size target ids."""
    draft = DraftArch.from_json(arch)
    tensors = initial_tensors(draft, seed)
    if draft.reduced_vocab:
        tensors[D2T] = torch.zeros(draft.draft_vocab_size, dtype=torch.int64)
        tensors[T2D] = torch.arange(draft.vocab_size) < draft.draft_vocab_size
    return tensors


# ---------------------------------------------------------------- writing
def replace_dir(tmp: Path, output: Path) -> None:
    """Move a finished directory into place; an existing output must be an earlier export."""
    if output.exists():
        if not (output / EXPORT_JSON).is_file():
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
        (tmp / CONFIG_JSON).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        provenance = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **provenance,
                      "weights_sha256": file_sha256(tmp / WEIGHTS),
                      "num_parameters": sum(t.numel() for n, t in tensors.items() if t.is_floating_point()),
                      "training": training}
        (tmp / EXPORT_JSON).write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / MODEL_CARD).write_text(render_model_card(config, provenance, training, results=None))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, output)
    return output


# ---------------------------------------------------------------- entry points
def _load_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(final tensors, final/draft.json, config.yaml, run.json) of a finished run (eaglecache/formats/run.py)."""
    weights, _ = run_format.final_paths(run_dir)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    arch = run_format.read_final_arch(run_dir)
    config_path = run_dir / run_format.CONFIG
    run_config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return tensors, arch, run_config or {}, run_format.read_run_json(run_dir, required=False) or {}


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
    if run_dir.name == run_format.FINAL and (run_dir / run_format.FINAL_ARCH).is_file():
        run_dir = run_dir.parent
    tensors, arch, run_config, run_info = _load_run(run_dir)
    config = vllm_draft_config(arch, max_model_len)
    target_norm = None
    if not any(n.removeprefix("model.") == OUTPUT_NORM for n in tensors):
        # The draft shares the target's final norm (frozen), so the run may not have saved it.
        if target_dir is None:
            raise UserError(f"{run_dir}/final has no norm.weight and the target is unknown")
        target_norm = read_head_tensors(target_dir, weights_prefix, ("norm",))["norm"]
    selected = select_draft_tensors(tensors, config, target_norm)
    provenance = {
        "source": "training run", "run_dir": str(run_dir.resolve()),
        "run_weights_sha256": file_sha256(run_format.final_paths(run_dir)[0]),
        "draft_json": arch,
        "target_path": str(target_dir) if target_dir else (run_config.get("target") or {}).get("path") or "tiny target",
        "run": run_info, "run_config": run_config,
    }
    summary = training_summary(run_config, run_info, (run_format.read_metrics(run_dir) or [{}])[-1])
    return write_draft_dir(output, config, selected, provenance, summary)


def build_untrained_draft(target_dir: str | Path, output: str | Path, seed: int = 0,
                          aux_layer_ids: list[int] | None = None, max_model_len: int | None = None,
                          draft_vocab_size: int | None = None, family: str = "eagle3", num_layers: int = 1,
                          aux_norm: str | None = None) -> Path:
    """A randomly initialised draft of ``family`` for `target_dir`, exported like a trained one."""
    arch = draft_architecture(target_dir, aux_layer_ids, draft_vocab_size, family, num_layers, aux_norm)
    config = vllm_draft_config(arch, max_model_len)
    tensors = select_draft_tensors(random_draft_tensors(arch, seed), config)
    provenance = {"source": "untrained (random init)", "seed": seed, "target_path": str(Path(target_dir).resolve()),
                  "target_config_sha256": file_sha256(Path(target_dir) / "config.json"), "draft_json": arch}
    return write_draft_dir(output, config, tensors, provenance, training=None)


def resolve_target_dir(config) -> Path:
    """The target directory the config names (the embedded tiny target when target.path is null)."""
    from eaglecache.target import resolve_target

    return Path(resolve_target(config))


def export(config, *, run_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Export the finished run in ``run_dir`` (or its final/) to the draft directory ``output`` for the target
    of ``config``; prints where it went and how to load it. ``overwrite`` as `--overwrite`."""
    from eaglecache import outputs

    outputs.claim_output(output, overwrite, "export", outputs.export_dir)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    # The target is only read when the run left out the (shared, frozen) final norm.
    target_dir = resolve_target_dir(config) if _lacks_norm(run_dir) else None
    output = export_run(run_dir, output, target_dir, config.target.weights_prefix, config.target.max_model_len)
    exported = json.loads((output / EXPORT_JSON).read_text())
    size_mib = (output / WEIGHTS).stat().st_size / 2**20
    spec = speculative_config(config, output)
    print(f"exported {run_dir} -> {output} ({exported['num_parameters']:,} parameters, {size_mib:.1f} MiB bf16)")
    print(f"load it with --speculative-config '{json.dumps(spec)}'")
    return output


def _lacks_norm(run_dir: Path) -> bool:
    weights = run_dir / run_format.FINAL / run_format.FINAL_WEIGHTS
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as f:
        return not any(n.removeprefix("model.") == OUTPUT_NORM for n in f.keys())
