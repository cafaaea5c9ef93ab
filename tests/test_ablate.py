"""`eaglecache ablate`: a grid of two keys (2 x 1 variants: each one a DeepSpeed launch) from one cache, its
table and plots, skipped on re-run, reproducible. The cartesian product of larger grids: the unit test."""

import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from eaglecache.cli import main
from eaglecache.errors import UserError
from eaglecache.formats.run import committed_steps
from eaglecache.train.ablate import expand, parse_grid, variant_name
from test_train_launcher import processes_mentioning, sigterm_after_a_checkpoint

TINY_TRAIN = ["train.max_steps=4", "train.global_batch_size=2", "train.micro_batch_size=1",
              "train.launcher.num_gpus=1", "train.max_seq_length=128", "train.log_interval=1",
              "train.checkpoint_interval=100", "train.dtype=float32", "train.warmup_ratio=0.0"]
GRID = ["--grid", "train.ttt_length=[1,2]", "--grid", "train.lr=[0.01]"]


def _weights(path: Path) -> bytes:
    """The tensors' bits in name order (safetensors' header key order is not stable across saves)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return b"".join(name.encode() + tensors[name].view(-1).view(torch.uint8).numpy().tobytes()
                    for name in sorted(tensors))


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_grid_expands_to_the_cartesian_product(tmp_path):
    grid = parse_grid(["train.ttt_length=[3,5,7]", "train.lr=[1e-4,3e-4]"], None)
    variants = expand(grid)
    assert len(variants) == 6 and {"train.ttt_length": 5, "train.lr": 3e-4} in variants
    assert len({variant_name(v) for v in variants}) == 6
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("train.seed: [0, 1]\n")
    assert expand(parse_grid([], str(grid_file))) == [{"train.seed": 0}, {"train.seed": 1}]


def test_a_null_grid_value_reaches_the_config_as_null():
    from eaglecache.config import load_config, with_overrides
    from eaglecache.train.ablate import override_strings

    (default, alpha) = expand(parse_grid(["train.lk_loss=[null,alpha]"], None))
    assert override_strings(default) == ["train.lk_loss=null"] and variant_name(default) == "lk_loss-null"
    assert with_overrides(load_config(None), override_strings(default)).train.lk_loss is None
    assert with_overrides(load_config(None), override_strings(alpha)).train.lk_loss == "alpha"


@pytest.mark.parametrize("grid, message", [
    (["precompute.codec=[zstd,none]"], "only train.* keys"),
    (["train.lr=1e-4"], "non-empty list"),
    ([], "no grid"),
])
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(UserError, match=message):
        parse_grid(grid, None)


def test_ablation_grid_table_plots_skip_and_reproducibility(tiny_cache, tmp_path, capsys):
    before = _tree_digest(tiny_cache)
    out = tmp_path / "ablate"
    args = ["ablate", "--cache", str(tiny_cache), "--output", str(out), *GRID, *TINY_TRAIN]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "2 trained" in first

    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("variant,train.ttt_length,train.lr,step,loss,acc_0")
    assert (out / "results.md").read_text().count("\n") == 2 + 2
    assert (out / "ablation.png").stat().st_size > 10_000
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/variant.json"))]
    assert len(records) == 2 and all(r["status"] == "done" and r["metrics"]["step"] == 4 for r in records)
    assert {len([k for k in r["metrics"] if k.startswith("acc_")]) for r in records} == {1, 2}
    weights = {r["name"]: _weights(out / r["name"] / "final" / "model.safetensors") for r in records}
    assert len(set(weights.values())) == 2, "variants must differ"

    assert main(args) == 0  # a re-run skips every finished variant
    assert "2 skipped (done before), 0 trained" in capsys.readouterr().out
    assert all(_weights(out / n / "final" / "model.safetensors") == w for n, w in weights.items())

    stale = records[1]  # as if an earlier code version had trained it: trained again, the old run kept aside
    record_path = out / stale["name"] / "variant.json"
    record_path.write_text(json.dumps({**stale, "fingerprint": {**stale["fingerprint"], "code": "0ld"}}))
    assert main(args) == 0
    assert "1 skipped (done before), 1 trained" in capsys.readouterr().out
    assert (out / ".stale" / f"{stale['name']}-0ld" / "final" / "model.safetensors").is_file()
    assert json.loads(record_path.read_text())["fingerprint"] == stale["fingerprint"]
    assert _weights(out / stale["name"] / "final" / "model.safetensors") == weights[stale["name"]]

    again = tmp_path / "again"  # the same variant from scratch: bit-identical weights and metrics
    name = records[0]["name"]
    grid = [f"--grid", f"train.ttt_length=[{records[0]['overrides']['train.ttt_length']}]",
            "--grid", f"train.lr=[{records[0]['overrides']['train.lr']}]"]
    assert main(["ablate", "--cache", str(tiny_cache), "--output", str(again), *grid, *TINY_TRAIN]) == 0
    assert _weights(again / name / "final" / "model.safetensors") == weights[name]
    timing = {"tokens_per_s", "data_wait_fraction", "wall_s", "peak_memory_gib"}
    curves = [[{k: v for k, v in json.loads(l).items() if k not in timing}
               for l in (root / name / "metrics.jsonl").read_text().splitlines()] for root in (out, again)]
    assert curves[0] == curves[1]

    assert _tree_digest(tiny_cache) == before, "an ablation wrote to the cache"


def test_ablate_bench_measures_every_family_in_vllm_in_one_table(tiny_cache, tmp_path, capsys):
    out = tmp_path / "families"
    args = ["ablate", "--cache", str(tiny_cache), "--output", str(out),
            "--grid", "train.draft.family=[eagle3,peagle]", "--bench", "humaneval", *TINY_TRAIN,
            "serve.max_prompts=2", "serve.max_new_tokens=16", "serve.single_stream_prompts=1",
            "target.kv_cache_gib=0.25"]
    assert main(args) == 0
    first = capsys.readouterr().out
    names = ["family-eagle3", "family-peagle"]
    assert "$ eaglecache export" in first and "$ eaglecache bench" in first

    for name in names:  # each variant exported in the layout vLLM loads for its family
        assert json.loads((out / "drafts" / name / "export.json").read_text())["source"] == "training run"
    assert "mask_token_id" in json.loads((out / "drafts" / "family-peagle" / "config.json").read_text())
    results = json.loads((out / "bench" / "results.json").read_text())
    rows = {r["draft"]: r for r in results["rows"]}
    assert sorted(rows) == names  # one engine per draft beside one shared target-alone baseline
    for row in rows.values():
        assert row["identical_to_target"] + row["departures_at_ties"] == row["n"] == 2, row
        assert row["num_drafts"] > 0 and row["one_stream_output_tokens"] > 0

    header, _, *lines = (out / "results.md").read_text().splitlines()
    assert header.split(" | ")[-2:] == ["vllm_accept_len_humaneval", "speedup_1_stream_humaneval |"]
    for line in lines:  # the ablation table carries vLLM's measured accept length next to the simulated one
        name = line.split(" | ")[0].removeprefix("| ")
        assert line.split(" | ")[-2] == f"{rows[name]['mean_accept_length']:.4f}"

    assert main(args) == 0  # again: nothing trained, exported or benched twice
    again = capsys.readouterr().out
    assert "2 skipped (done before), 0 trained" in again and "vLLM bench: done before, skipped" in again


def test_a_lone_variant_benched_alone_keeps_its_name_in_the_table():
    from eaglecache.train.ablation_bench import vllm_rows

    # bench labels a lone trained draft "trained"; the ablation table is keyed by variant name
    results = {"rows": [{"draft": "trained", "prompt_set": "humaneval", "mean_accept_length": 2.5,
                         "one_stream_speedup": 1.2}]}
    assert vllm_rows(results, ["ttt_length-7"]) == {
        "ttt_length-7": {"vllm_accept_len_humaneval": 2.5, "speedup_1_stream_humaneval": 1.2}}


def test_sigterm_to_ablate_stops_the_running_variant_and_starts_no_other(tiny_cache, tmp_path):
    """The variants' launchers run from worker threads, where no signal handler can be set; the stop still
    reaches their ranks, and the grid goes no further."""
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "eaglecache.cli", "ablate", "--cache", str(tiny_cache), "--output", str(out),
           "--grid", "train.ttt_length=[1,2]", *TINY_TRAIN, "train.max_steps=4000", "train.epochs=1000",
           "train.checkpoint_interval=2"]
    first, second = (out / variant_name({"train.ttt_length": n}) for n in (1, 2))
    returncode, stderr = sigterm_after_a_checkpoint(cmd, first, out)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; run the same command again")
    time.sleep(2)  # the runner's SIGKILLs land
    assert processes_mentioning(str(out)) == [], "a launcher or rank outlived the stopped ablation"
    assert committed_steps(first) and not second.exists()
