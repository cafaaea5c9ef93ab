"""The vLLM settings the serve stage runs the target with, shared by `bench` (offline LLM) and `serve`.

One function builds the engine settings from the config; the offline benchmark passes them to
`vllm.LLM(**kwargs)` and the server turns the same dict into `vllm serve` flags, so the two
never drift apart. Also here: checking that a draft directory fits the target before a
30-second engine start finds out the hard way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from eaglecache.errors import UserError
from eaglecache.formats.draft import CONFIG_JSON, served_aux_layer_ids, vllm_method
from eaglecache.target import target_config


def serving_max_model_len(config, target_dir: Path) -> int:
    """Context length of the served target: target.max_model_len, else the target's own limit."""
    if config.target.max_model_len:
        return int(config.target.max_model_len)
    return int(target_config(target_dir).get("max_position_embeddings") or config.data.max_seq_length)


def speculative_config(config, draft_dir: str | Path) -> dict[str, Any]:
    """vLLM's speculative config for an exported draft: the method and ``parallel_drafting`` follow from
    the draft's own config.json (a P-EAGLE draft, with ``mask_token_id``, drafts its slots in parallel)."""
    draft_config = json.loads((Path(draft_dir) / CONFIG_JSON).read_text())
    spec = {**vllm_method(draft_config), "model": str(Path(draft_dir).resolve()),
            "num_speculative_tokens": config.serve.num_speculative_tokens}
    if spec["method"] == "dflash" and int(draft_config.get("num_hidden_layers", 1)) > 1 and not _has_cuda():
        print(f"warning: {draft_dir} is a {draft_config['num_hidden_layers']}-layer DFlash draft; vLLM 0.32's CPU "
              "build norms every layer's context keys with layer 0's k_norm, so it will accept fewer tokens than "
              "trained (outputs stay correct). On CPU, train DFlash with train.draft.num_layers=1.", file=sys.stderr)
    return spec


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_settings(config, target_dir: Path, draft_dir: str | Path | None) -> dict[str, Any]:
    """vLLM engine arguments (the names of `vllm.LLM` / `EngineArgs`) for the target and draft."""
    settings: dict[str, Any] = {
        "model": str(target_dir),
        **config.target.vllm_engine_args(config.serve.tensor_parallel_size),
        "max_model_len": serving_max_model_len(config, target_dir),
        "seed": config.serve.seed,
        "disable_log_stats": False,  # the spec-decode counters are stats
    }
    if draft_dir is not None:
        settings["speculative_config"] = speculative_config(config, draft_dir)
    return settings


def vllm_serve_flags(settings: dict[str, Any]) -> list[str]:
    """The same settings as `vllm serve MODEL --flag value ...` arguments."""
    flags = [settings["model"]]
    for key, value in settings.items():
        if key == "model" or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "disable_log_stats":
            if value:
                flags.append(flag)
        elif isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def check_draft_fits_target(draft_config: dict[str, Any], target_dir: Path) -> None:
    """The draft's vocab, hidden width and aux layers must exist in the target."""
    target = target_config(target_dir)
    name = f"draft for a target with hidden {draft_config.get('target_hidden_size')}, vocab {draft_config.get('vocab_size')}"
    if draft_config.get("vocab_size") != target.get("vocab_size"):
        raise UserError(f"{name} does not fit the target {target_dir} (vocab {target.get('vocab_size')})")
    if draft_config.get("target_hidden_size") != target.get("hidden_size"):
        raise UserError(f"{name} does not fit the target {target_dir} (hidden {target.get('hidden_size')})")
    num_layers = int(target["num_hidden_layers"])
    aux = served_aux_layer_ids(draft_config)
    if any(not 0 <= int(i) <= num_layers for i in aux):
        raise UserError(f"draft aux layer ids {aux} are outside the target's 0..{num_layers}")
