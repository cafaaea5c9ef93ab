"""Markdown for people: the acceptance table (the seed card's columns) and the draft's model card.

The table is the same in `eaglecache bench`'s results.md, in the draft's README.md and in the
demo's final printout, so it is rendered in one place.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from eaglecache.formats.draft import served_aux_layer_ids, vllm_method


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _speed_cells(row: Mapping[str, Any], prefix: str) -> list[str]:
    with_draft, alone = row.get(f"{prefix}tokens_per_s"), row.get(f"{prefix}baseline_tokens_per_s")
    if with_draft is None and alone is None:
        return ["-", "-"]
    return [f"{_fmt(with_draft, 1)} / {_fmt(alone, 1)}", _fmt(row.get(f"{prefix}speedup"), 2)]


def results_table(rows: Sequence[Mapping[str, Any]], num_speculative_tokens: int) -> str:
    """One line per (draft, prompt set): n, mean accept length, accept rates, tokens/s at one stream and at
    the full batch, each with and without the draft."""
    positions = [f"pos {i + 1}" for i in range(num_speculative_tokens)]
    header = ["draft", "prompt set", "n", "mean accept length", "draft accept rate", *positions,
              "tok/s 1 stream (draft / alone)", "speedup 1 stream", "tok/s batch (draft / alone)", "speedup batch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        per_pos = list(row.get("per_position_accept_rate") or []) + [None] * num_speculative_tokens
        cells = [row["draft"], row["prompt_set"], row["n"], _fmt(row["mean_accept_length"]),
                 _fmt(row["draft_accept_rate"]), *[_fmt(p) for p in per_pos[:num_speculative_tokens]],
                 *_speed_cells(row, "one_stream_"), *_speed_cells(row, "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


FAMILY_NOTES = {
    "EAGLE3": "one decoder layer over the target's aux states, drafting one token per forward",
    "EAGLE 3.1": "EAGLE3 with the aux states normalized before fc and the post-norm state carried between steps",
    "P-EAGLE": "parallel drafting: every token after the first is drafted in the same forward, from a learned "
               "mask state",
    "DFlash": "block drafting: a block of mask tokens drafted in one forward, attending to the target's "
              "context states",
}


def family_name(config: Mapping[str, Any]) -> str:
    """The family of an exported draft's config.json, by the keys vLLM reads."""
    if "DFlashDraftModel" in (config.get("architectures") or []):
        return "DFlash"
    if config.get("mask_token_id") is not None:
        return "P-EAGLE"
    if config.get("norm_output") or config.get("norm_before_fc") or config.get("fc_norm"):
        return "EAGLE 3.1"
    return "EAGLE3"


def render_model_card(config: Mapping[str, Any], provenance: Mapping[str, Any],
                      training: Mapping[str, Any] | None, results: Mapping[str, Any] | None) -> str:
    """README.md of an exported draft: what it is, how to load it, how it was trained, how it did."""
    aux = served_aux_layer_ids(config)
    vocab_note = ("full target vocabulary; embedding and LM head shared with the target"
                  if config["draft_vocab_size"] == config["vocab_size"]
                  else f"reduced draft vocabulary of {config['draft_vocab_size']} (d2t/t2d included); "
                       "embedding shared with the target")
    family = family_name(config)
    spec = {**vllm_method(config), "model": "<this directory>", "num_speculative_tokens": 3}
    parts = [
        f"# {family} draft (eaglecache)\n",
        f"Family: {family} ({FAMILY_NOTES[family]}). "
        f"A {config.get('num_hidden_layers', 1)}-layer `{config['architectures'][0]}` draft for the target "
        f"`{provenance.get('target_path')}` "
        f"(hidden {config['target_hidden_size']}, vocab {config['vocab_size']}), fed by the target's layers "
        f"{aux} ({vocab_note}). Source: {provenance.get('source')}.\n",
        "## Use with vLLM\n",
        f"```bash\nvllm serve <target> --speculative-config '{json.dumps(spec)}'\n```\n",
        "## Architecture\n",
        "| key | value |\n|---|---|\n" + "".join(
            f"| {k} | {config.get(k)} |\n" for k in
            ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "draft_vocab_size", "max_position_embeddings")),
    ]
    if training:
        parts += ["## Training\n", "| setting | value |\n|---|---|\n"
                  + "".join(f"| {k} | {_fmt(v, 6)} |\n" for k, v in training.items())]
    parts.append("## Acceptance\n")
    if results and results.get("rows"):
        k = results["num_speculative_tokens"]
        parts.append(f"Measured by `eaglecache bench` in vLLM {results.get('vllm_version')} with {k} speculative "
                     f"tokens, {'greedy' if not results.get('temperature') else 'T=' + str(results['temperature'])} "
                     f"decoding, up to {results.get('max_new_tokens')} new tokens per prompt. Mean accept length "
                     "= 1 + accepted / drafts; draft accept rate = accepted / draft tokens; pos i = share of "
                     "drafts whose i-th token was accepted.\n")
        parts.append(results_table(results["rows"], k))
    else:
        parts.append("Not measured yet: run `eaglecache bench --draft <this directory> --prompts humaneval ...`.\n")
    parts.append(f"\nProvenance: export.json (weights sha256 {provenance.get('weights_sha256', '-')}).\n")
    return "\n".join(parts)
