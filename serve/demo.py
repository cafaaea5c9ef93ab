"""`eaglecache demo`: every stage end to end on the embedded tiny target, then the model-card table.

The demo is a script of the real commands, each run as its own `eaglecache` process with the
demo's resolved config (OUTPUT/config.yaml), exactly as a user would chain them:

  select     ShareGPT training-split conversations (never the target's held-out ones), first exchange
  data regenerate   the target answers them itself (vLLM, greedy)
  data prepare      chat template, loss masks, Parquet
  precompute        vLLM dumps aux + final hidden states into the Zarr cache
  train             DeepSpeed ZeRO-3, TTT, 2 CPU ranks (train.launcher)
  export            the draft directory vLLM loads
  bench             HumanEval + held-out ShareGPT: the trained draft vs the target alone

Each stage writes its output atomically, so a stage whose output exists is skipped when the demo
is run again on the same directory (the commands are in OUTPUT/commands.sh). The end prints the
acceptance table and compares the training-time simulated accept length with the measured one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from eaglecache.errors import UserError
from eaglecache.formats import run as run_format
from eaglecache.formats.draft import EXPORT_JSON

SUBSET = "sharegpt-subset.jsonl"


def select_conversations(target_dir: Path, num_conversations: int, output: Path) -> int:
    """The first exchange of the first N ShareGPT conversations outside the target's held-out split."""
    from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages

    heldout = json.loads((target_dir / "heldout.json").read_text()) if (target_dir / "heldout.json").is_file() else {}
    heldout_ids = set(heldout.get("heldout_ids") or [])
    heldout_indices = set(heldout.get("heldout_record_indices") or [])
    lines = []
    for index, record in iter_sharegpt(sharegpt_path()):
        if index in heldout_indices or str(record.get("id")) in heldout_ids:
            continue
        try:
            messages = sharegpt_to_messages(record)
        except ValueError:
            continue
        if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant" \
                and messages[0]["content"].strip():
            lines.append(json.dumps({"messages": messages[:2], "source_record_index": index}))
        if len(lines) == num_conversations:
            break
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(output)
    return len(lines)


def _cache_complete(path: Path) -> bool:
    from eaglecache.formats.cache_reader import open_cache

    try:
        open_cache(path)
        return True
    except (UserError, OSError, ValueError, KeyError):
        return False


def _done(path: Path) -> bool:
    return _cache_complete(path) if path.name == "cache" else path.exists()


def _stage_commands(out: Path, config_path: Path, bench_prompts: int) -> list[tuple[str, Path, list[str]]]:
    """(title, output that marks the stage done, eaglecache argv) for each stage after selection."""
    common = ["--config", str(config_path)]
    return [
        ("regenerate answers with the target (vLLM)", out / "regenerated.jsonl",
         ["data", "regenerate", "--input", str(out / SUBSET), "--output", str(out / "regenerated.jsonl"), *common]),
        ("tokenize and mask (data prepare)", out / "dataset" / "dataset.json",
         ["data", "prepare", "--input", str(out / "regenerated.jsonl"), "--output", str(out / "dataset"), *common]),
        ("hidden states into the Zarr cache (precompute)", out / "cache",
         ["precompute", "--data", str(out / "dataset"), "--output", str(out / "cache"), *common]),
        ("train the draft (DeepSpeed ZeRO-3, TTT)", out / "run" / run_format.FINAL / run_format.FINAL_WEIGHTS,
         ["train", "--cache", str(out / "cache"), "--output", str(out / "run"), *common]),
        ("export for vLLM", out / "draft" / EXPORT_JSON,
         ["export", "--run-dir", str(out / "run"), "--output", str(out / "draft"), *common]),
        ("benchmark: trained draft vs no draft (vLLM)", out / "bench" / "results.json",
         ["bench", "--draft", str(out / "draft"), "--prompts", "humaneval", "sharegpt-heldout",
          "--output", str(out / "bench"), *common, f"serve.max_prompts={bench_prompts}"]),
    ]


def _run_stage(number: int, total: int, title: str, argv: list[str], env: dict[str, str]) -> float:
    print(f"\n=== [{number}/{total}] {title}\n$ eaglecache {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "eaglecache.cli", *argv], env=env)
    seconds = time.perf_counter() - start
    if code != 0:
        raise UserError(f"demo stage '{title}' failed (exit {code}); rerun `eaglecache demo` with the same "
                        "--output to continue from it")
    print(f"--- done in {seconds:.0f} s", flush=True)
    return seconds


def final_simulated_accept_length(run_dir: Path, last_records: int = 5) -> float | None:
    """Mean accept_len_3 of the last logged training steps (train/metrics.py)."""
    values = [r["accept_len_3"] for r in run_format.read_metrics(run_dir) if "accept_len_3" in r][-last_records:]
    return sum(values) / len(values) if values else None


def summary_text(out: Path, timings: dict[str, float]) -> str:
    from eaglecache.serve.card import results_table

    results = json.loads((out / "bench" / "results.json").read_text())
    lines = ["", "=== EAGLE3 draft on the tiny target: acceptance in vLLM", "",
             results_table(results["rows"], results["num_speculative_tokens"])]
    simulated = final_simulated_accept_length(out / "run")
    trained = [r for r in results["rows"] if r["draft"] == "trained" and r["mean_accept_length"]]
    if simulated and trained:
        for row in trained:
            gap = (simulated - row["mean_accept_length"]) / row["mean_accept_length"]
            lines.append(f"simulated accept length from training {simulated:.3f} vs measured "
                         f"{row['mean_accept_length']:.3f} on {row['prompt_set']} ({100 * gap:+.1f}%)")
    identical = [f"{r['draft']}/{r['prompt_set']} {r['identical_to_target']}/{r['n']}"
                 + (f" (+{r['departures_at_ties']} departing at a bf16 tie of the target)" if r["departures_at_ties"] else "")
                 for r in results["rows"] if "identical_to_target" in r]
    if identical:
        lines.append("greedy outputs identical to the target alone: " + ", ".join(identical))
    lines.append("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
                 + f"; total {sum(timings.values()):.0f}s")
    lines.append(f"draft: {out / 'draft'} (model card README.md); results: {out / 'bench' / 'results.md'}")
    return "\n".join(lines)


def demo(config, *, output: str | Path, overwrite: bool = False, verbose: bool = False) -> int:
    """Every stage on the embedded tiny target into ``output`` (resuming the stages done there); ``verbose``
    keeps vLLM's own logging. ``overwrite`` as `--overwrite`."""
    from eaglecache import outputs
    from eaglecache.target import resolve_target

    outputs.claim_output(output, overwrite, "demo", outputs.demo_dir)
    if config.train.launcher.num_nodes != 1:
        raise UserError("the demo runs on one machine: train.launcher.num_nodes must be 1")
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "TOKENIZERS_PARALLELISM": "false"}
    if not verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    timings: dict[str, float] = {}
    stages = _stage_commands(out, config_path, config.serve.demo.bench_prompts)
    total = len(stages) + 1
    start = time.perf_counter()
    print(f"=== [1/{total}] tiny target and ShareGPT training-split conversations", flush=True)
    target_dir = resolve_target(config)
    if not (out / SUBSET).is_file():
        count = select_conversations(target_dir, config.serve.demo.num_conversations, out / SUBSET)
        print(f"{count} conversations (first exchange) -> {out / SUBSET}")
    timings["select"] = time.perf_counter() - start
    (out / "commands.sh").write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + "".join(
        f"eaglecache {shlex.join(argv)}\n" for _, _, argv in stages))
    for number, (title, done, argv) in enumerate(stages, start=2):
        if _done(done):
            print(f"\n=== [{number}/{total}] {title}: already done ({done})", flush=True)
            continue
        timings[argv[0] if argv[0] != "data" else argv[1]] = _run_stage(number, total, title, argv, env)
    text = summary_text(out, timings)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0
