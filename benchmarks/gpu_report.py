"""The GPU check's table (scripts/gpu_check.sh): what a demo run and a CPU training run of the same cache measured.

From a demo directory (``eaglecache demo --output DIR``): precompute tokens/s (the cache's tokens over the
precompute stage's wall time, vLLM's start included), training tokens/s, data wait and peak memory (the
run's metrics.jsonl: the mean of the logged intervals after the first, which holds the warm-up; peak
memory is rank 0's, GPU memory allocated by torch on CUDA, resident set on a CPU), and the trained draft's
mean accept length per prompt set (bench/results.json). From a second training run (``--cpu-run``) on
the same cache, the same training figures, side by side.

    python benchmarks/gpu_report.py --demo runs/gpu-check/gpu --cpu-run runs/gpu-check/cpu-train
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional


def training_figures(run_dir: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl has no records")
    steady = records[1:] or records
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    return {"steps": records[-1]["step"], "tokens_per_s": mean("tokens_per_s"),
            "data_wait_fraction": mean("data_wait_fraction"),
            "peak_memory_gib": max(r.get("peak_memory_gib", 0.0) for r in records),
            "accept_len_3": records[-1]["accept_len_3"]}


def stage_seconds(demo_dir: Path) -> dict[str, float]:
    """The demo's stage times, from the ``stage times:`` line of its summary.txt."""
    line = next((l for l in (demo_dir / "summary.txt").read_text().splitlines() if l.startswith("stage times:")), "")
    return {name: float(seconds) for name, seconds in re.findall(r"(\w+) ([\d.]+)s", line) if name != "total"}


def report(demo_dir: Path, cpu_run: Optional[Path] = None) -> str:
    from eaglecache.formats.cache_reader import open_cache

    cache_tokens = open_cache(demo_dir / "cache").total_tokens
    seconds = stage_seconds(demo_dir)
    results = json.loads((demo_dir / "bench" / "results.json").read_text())
    runs = {"demo run": training_figures(demo_dir / "run")}
    if cpu_run is not None:
        runs["CPU run, same cache"] = training_figures(cpu_run)
    lines = [f"precompute: {cache_tokens:,} tokens in {seconds.get('precompute', float('nan')):.0f} s "
             f"= {cache_tokens / seconds['precompute']:,.0f} tokens/s (vLLM's start included)" if "precompute" in seconds
             else "precompute: no stage time in summary.txt", "",
             "| training | steps | tokens/s | data wait | peak memory GiB | simulated accept length (3) |",
             "|---|---|---|---|---|---|"]
    for name, f in runs.items():
        lines.append(f"| {name} | {f['steps']} | {f['tokens_per_s']:,.0f} | {100 * f['data_wait_fraction']:.2f} % | "
                     f"{f['peak_memory_gib']:.2f} | {f['accept_len_3']:.2f} |")
    lines += ["", "| prompt set | n | mean accept length | draft accept rate |", "|---|---|---|---|"]
    for row in results["rows"]:
        if row["draft"] == "trained":
            lines.append(f"| {row['prompt_set']} | {row['n']} | {row['mean_accept_length']:.3f} | "
                         f"{row['draft_accept_rate']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, required=True, help="A demo output directory.")
    parser.add_argument("--cpu-run", type=Path, default=None, help="A training run of the same cache to compare.")
    args = parser.parse_args(argv)
    print(report(args.demo, args.cpu_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
