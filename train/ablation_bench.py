"""``eaglecache ablate --bench SET ...``: every finished variant exported and measured in vLLM, side by side.

After training, each variant's final weights are exported to ``OUTPUT/drafts/<variant>`` and all the
drafts are benchmarked together into ``OUTPUT/bench`` (one target-alone baseline, the same prompt sets,
one results.md and acceptance plot). Both steps run the serve stage's own commands, `eaglecache export`
and `eaglecache bench`, as child processes with each run's config.yaml, exactly as a user would: the
training stage never imports vLLM, and vLLM's memory is returned when the child exits.

The bench is skipped when ``OUTPUT/bench/ablation.json`` records the same variants (by fingerprint),
prompt sets and serving settings. ``vllm_rows`` gives the ablation table its measured columns next to
the training-time simulated accept length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from eaglecache.errors import UserError
from eaglecache.formats import run as run_format

log = logging.getLogger(__name__)
DRAFTS, BENCH, BENCH_RECORD = "drafts", "bench", "ablation.json"


def _command(name: str, args: list[str]) -> None:
    """Run `eaglecache NAME ARGS` in a child process, its output shown as it comes; a failure is one line."""
    print(f"$ eaglecache {shlex.join([name, *args])}", flush=True)
    code = subprocess.call([sys.executable, "-m", "eaglecache.cli", name, *args])
    if code != 0:
        raise UserError(f"`eaglecache {name}` failed (exit {code}), see its output above; the trained variants "
                        "are kept, so the same `eaglecache ablate` command continues from here")


def _bench_key(records: list[dict[str, Any]], prompt_sets: list[str], serve_identity: dict[str, Any]) -> str:
    content = {"variants": sorted((r["name"], json.dumps(r["fingerprint"], sort_keys=True)) for r in records),
               "prompt_sets": prompt_sets, "serve": serve_identity}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def export_and_bench(output: Path, records: list[dict[str, Any]], prompt_sets: list[str],
                     serve_identity: dict[str, Any]) -> dict[str, Any]:
    """Export each finished variant and bench them all in vLLM; returns bench's results.json document."""
    done = [r for r in records if r["status"] == "done"]
    if not done:
        raise UserError("no finished variant to benchmark")
    bench_dir = output / BENCH
    key = _bench_key(done, prompt_sets, serve_identity)
    record_path = bench_dir / BENCH_RECORD
    if record_path.is_file() and json.loads(record_path.read_text()).get("key") == key:
        log.info("vLLM bench of these variants: done already, skipped")
        print("vLLM bench: done before, skipped")
        return json.loads((bench_dir / "results.json").read_text())
    draft_dirs = []
    for record in done:
        run_dir = output / record["name"]
        config = str(run_dir / run_format.CONFIG)  # the run's own resolved settings, target and serve included
        draft_dir = output / DRAFTS / record["name"]
        _command("export", ["--config", config, "--run-dir", str(run_dir), "--output", str(draft_dir),
                            "--overwrite"])
        draft_dirs.append(str(draft_dir))
    # only train.* keys vary across variants, so any variant's config holds the target and serve settings
    _command("bench", ["--config", str(output / done[0]["name"] / run_format.CONFIG), "--draft", *draft_dirs,
                       "--prompts", *prompt_sets, "--output", str(bench_dir), "--overwrite"])
    tmp = record_path.with_name(f".{BENCH_RECORD}.tmp")
    tmp.write_text(json.dumps({"key": key, "variants": [r["name"] for r in done], "prompt_sets": prompt_sets},
                              indent=2))
    os.replace(tmp, record_path)
    return json.loads((bench_dir / "results.json").read_text())


def vllm_rows(results: dict[str, Any], variant_names: list[str]) -> dict[str, dict[str, Any]]:
    """{variant: {column: value}}: vLLM's mean accept length per prompt set, and tokens/s speedups. Bench labels
    rows by draft directory (the variant's name), or "trained" when it measured one draft alone."""
    labels = {row["draft"] for row in results["rows"]}
    rename = {labels.pop(): variant_names[0]} if len(labels) == 1 and len(variant_names) == 1 else {}
    by_variant: dict[str, dict[str, Any]] = {}
    for row in results["rows"]:
        columns = by_variant.setdefault(rename.get(row["draft"], row["draft"]), {})
        columns[f"vllm_accept_len_{row['prompt_set']}"] = row["mean_accept_length"]
        columns[f"speedup_1_stream_{row['prompt_set']}"] = row.get("one_stream_speedup")
    return by_variant
