"""The results of an ablation: a Markdown and a CSV table, and PNG plots of accuracy and accept length.

One row per finished variant: its grid values, then the last logged metrics of
its run (loss, per-TTT-position accuracy, simulated accept length with 3 and with
all speculative tokens, tokens/s). Plots: per-position accuracy per variant, and
the simulated accept length over training steps per variant.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from eaglecache.formats import run as run_format
from eaglecache.train.config import MAX_TTT_LENGTH


def _columns(records: list[dict[str, Any]], grid_keys: list[str]) -> list[str]:
    acc_keys = sorted({k for r in records for k in r["metrics"] if k.startswith("acc_")},
                      key=lambda k: int(k.split("_")[1]))
    return ["variant", *grid_keys, "step", "loss", *acc_keys, "accept_len_3", "accept_len_all", "tokens_per_s"]


def _row(record: dict[str, Any], columns: list[str]) -> list[Any]:
    values = {"variant": record["name"], **record["overrides"], **record["metrics"]}
    row = []
    for column in columns:
        value = values.get(column, "")
        row.append(f"{value:.4f}" if isinstance(value, float) else value)
    return row


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plots(out_dir: Path, records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(11, 4))
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


def write_report(out_dir: Path, records: list[dict[str, Any]], grid_keys: list[str]) -> str:
    """results.md, results.csv and ablation.png in ``out_dir``; returns the Markdown table."""
    done = [r for r in records if r["status"] == "done"]
    columns = _columns(done, grid_keys)
    rows = [_row(r, columns) for r in done]
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
        _plots(out_dir, done)
    return table
