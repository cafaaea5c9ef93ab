"""The results of an ablation: a Markdown and a CSV table, and PNG plots of accuracy and accept length.

One row per finished variant: its grid values, then the last logged metrics of
its run (loss, per-TTT-position accuracy, simulated accept length with 3 and with
all speculative tokens, tokens/s) and, when the variants were benchmarked in vLLM
(``--bench``), the measured mean accept length per prompt set and the one-stream
speedup. Plots: per-position accuracy per variant, the simulated accept length
over training steps per variant and, when measured, simulated against vLLM's.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from eaglecache.formats import run as run_format
from eaglecache.train.config import MAX_TTT_LENGTH


def _columns(records: list[dict[str, Any]], grid_keys: list[str], measured: dict[str, dict[str, Any]]) -> list[str]:
    acc_keys = sorted({k for r in records for k in r["metrics"] if k.startswith("acc_")},
                      key=lambda k: int(k.split("_")[1]))
    vllm_keys = list(dict.fromkeys(k for columns in measured.values() for k in columns))
    return ["variant", *grid_keys, "step", "loss", *acc_keys, "accept_len_3", "accept_len_all", "tokens_per_s",
            *vllm_keys]


def _row(record: dict[str, Any], columns: list[str], measured: dict[str, dict[str, Any]]) -> list[Any]:
    values = {"variant": record["name"], **record["overrides"], **record["metrics"],
              **measured.get(record["name"], {})}
    row = []
    for column in columns:
        value = values.get(column, "")
        row.append(f"{value:.4f}" if isinstance(value, float) else value)
    return row


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plot_measured(ax, records: list[dict[str, Any]], measured: dict[str, dict[str, Any]]) -> None:
    """Grouped bars per variant: the simulated accept length (3 tokens), then vLLM's per prompt set."""
    names = [r["name"] for r in records]
    series = {"simulated (training)": [r["metrics"].get("accept_len_3") for r in records]}
    for key in dict.fromkeys(k for m in measured.values() for k in m if k.startswith("vllm_accept_len_")):
        series[f"vLLM {key.removeprefix('vllm_accept_len_')}"] = [measured.get(n, {}).get(key) for n in names]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], [v or 0.0 for v in values], width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=20, ha="right", fontsize=7)
    ax.set(ylabel="mean accept length (3 tokens)", title="Simulated vs measured in vLLM")
    ax.legend(fontsize=7)


def _plots(out_dir: Path, records: list[dict[str, Any]], measured: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if measured else 2, figsize=(16 if measured else 11, 4))
    ax_acc, ax_len = axes[0], axes[1]
    if measured:
        _plot_measured(axes[2], records, measured)
    for record in records:
        metrics = record["metrics"]
        accs = [metrics[f"acc_{k}"] for k in range(MAX_TTT_LENGTH) if f"acc_{k}" in metrics]
        ax_acc.plot(range(1, len(accs) + 1), accs, marker="o", label=record["name"])
        curve = run_format.read_metrics(out_dir / record["name"])
        ax_len.plot([c["step"] for c in curve], [c["accept_len_3"] for c in curve], label=record["name"])
    ax_acc.set(xlabel="TTT position", ylabel="accuracy (last log)", title="Per-position accuracy")
    ax_len.set(xlabel="step", ylabel="simulated accept length (3 tokens)", title="Simulated accept length")
    for ax in (ax_acc, ax_len):
        ax.grid(alpha=0.3)
    ax_len.legend(fontsize=7)
    fig.tight_layout()
    tmp = out_dir / ".ablation.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_dir / "ablation.png")


def write_report(out_dir: Path, records: list[dict[str, Any]], grid_keys: list[str],
                 measured: dict[str, dict[str, Any]] | None = None) -> str:
    """results.md, results.csv and ablation.png in ``out_dir``; returns the Markdown table. ``measured``:
    {variant: {column: value}} from the vLLM bench (train/ablation_bench.py ``vllm_rows``)."""
    measured = measured or {}
    done = [r for r in records if r["status"] == "done"]
    columns = _columns(done, grid_keys, measured)
    rows = [_row(r, columns, measured) for r in done]
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table = header + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in rows)
    _write_atomic(out_dir / "results.md", table)
    tmp = out_dir / ".results.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    os.replace(tmp, out_dir / "results.csv")
    if done:
        _plots(out_dir, done, measured)
    return table
