"""`eaglecache demo` end to end on the tiny target with the default config (fewer conversations on CPUs
without native bf16: SIZE below): the issue's acceptance targets.

Slow (the whole pipeline: regenerate, prepare, precompute, 2-rank ZeRO-3 training, export, two
vLLM engines for the benchmark) but it runs in CI: it is the README's main job.
"""

import json
import subprocess
import sys

import pytest

from eaglecache.dtypes import cpu_has_native_bf16

pytestmark = pytest.mark.slow


# Without native bf16 everything computes in float32 and the default demo (2,000 conversations, 400 steps)
# took 38 of CI's 90 minutes on 2 AVX2-only cores (30 without the untrained-draft engine it then had);
# there the test trains on 1,200 (235 steps, 19.5 minutes). Accept lengths (HumanEval / held-out
# ShareGPT): 2,000 in bf16 on AVX512_BF16 2.50 / 2.31, in float32 on AVX2 2.96 / 3.18; 1,200 in float32 on
# AVX2 2.54 / 2.94. Fewer steps do not do with a bf16 target: 200 gave 1.94 / 1.80 there.
SIZE = [] if cpu_has_native_bf16() else ["serve.demo.num_conversations=1200"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_target):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run([sys.executable, "-m", "eaglecache.cli", "demo", "--output", str(out), *SIZE],
                          capture_output=True, text=True, timeout=45 * 60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "stdout": proc.stdout, "results": json.loads((out / "bench" / "results.json").read_text())}


def _rows(results, draft):
    return {r["prompt_set"]: r for r in results["rows"] if r["draft"] == draft}


def test_trained_draft_reaches_the_acceptance_target(demo):
    trained = _rows(demo["results"], "trained")
    assert set(trained) == {"humaneval", "sharegpt-heldout"}
    assert {r["draft"] for r in demo["results"]["rows"]} == {"trained"}
    assert trained["humaneval"]["n"] == 164
    for name in trained:
        # measured figures at SIZE above. (An untrained draft accepts nothing: tests/test_bench.py.)
        assert trained[name]["mean_accept_length"] >= 2.2, trained[name]


def test_speculative_decoding_is_lossless_for_both_drafts(demo):
    for row in demo["results"]["rows"]:
        # bf16 ties of the target may break either way in the batched verify: bench.TIE_NATS
        assert row["identical_to_target"] + row["departures_at_ties"] == row["n"], row
        assert row["departures_at_ties"] <= max(1, row["n"] // 100), row


def test_training_simulation_predicts_the_measured_accept_length(demo):
    from eaglecache.serve.demo import final_simulated_accept_length

    simulated = final_simulated_accept_length(demo["out"] / "run")
    measured = _rows(demo["results"], "trained")["sharegpt-heldout"]["mean_accept_length"]
    assert abs(simulated - measured) / measured <= 0.10, (simulated, measured)


def test_demo_prints_the_card_and_leaves_every_artifact(demo):
    out = demo["out"]
    assert "| draft | prompt set | n | mean accept length |" in demo["stdout"]
    assert "simulated accept length from training" in demo["stdout"]
    for path in ("config.yaml", "commands.sh", "dataset/dataset.json", "cache/cache.json",
                 "run/final/model.safetensors", "draft/config.json", "draft/README.md", "bench/acceptance.png"):
        assert (out / path).exists(), path
    assert "Not measured yet" not in (out / "draft" / "README.md").read_text()
