"""`eaglecache bench` on the tiny target in vLLM: lossless greedy decoding, consistent counters, the outputs.

One bench run is shared by the module: the target alone, then with an untrained draft with a reduced
draft vocab (its own LM head and d2t/t2d), over three prompt sets. Untrained drafts have their tokens
rejected, so acceptance near zero is expected here. Full-vocab drafts (sharing the target's LM head)
run in test_serve.py, and `--untrained-baseline` and a trained draft in test_demo.py.
"""

import json
import subprocess
import sys

import pytest

from eaglecache.cli import main
from eaglecache.serve.export import build_untrained_draft
from eaglecache.serve.metrics import SpecCounters, counters_from_prometheus
from eaglecache.serve.prompts import load_prompt_set

NUM_PROMPTS = 3
SETTINGS = [f"serve.max_prompts={NUM_PROMPTS}", "serve.max_new_tokens=24", "target.kv_cache_gib=0.25",
            "serve.num_speculative_tokens=3"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_target):
    root = tmp_path_factory.mktemp("bench")
    draft = build_untrained_draft(tiny_target, root / "reduced", seed=0, draft_vocab_size=1024)
    prompts = root / "mine.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Write a haiku about the sea."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "What is 2+2?"}]},
    ]) + "\n")
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "eaglecache.cli", "bench", "--draft", str(draft), "--prompts", "humaneval",
         "sharegpt-heldout", str(prompts), "--output", str(out), f"target.path={tiny_target}", *SETTINGS],
        capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"draft": draft, "out": out, "stdout": proc.stdout,
            "results": json.loads((out / "results.json").read_text())}


def test_greedy_outputs_with_and_without_the_draft_are_identical(bench):
    rows = bench["results"]["rows"]
    assert [(r["draft"], r["prompt_set"]) for r in rows] == [
        ("reduced", name) for name in ("humaneval", "sharegpt-heldout", "mine")]
    for row in rows:
        # A departure is only excused where the target's own top two log-probs tie (bf16): see bench.TIE_NATS.
        assert row["n"] > 0 and row["identical_to_target"] + row["departures_at_ties"] == row["n"], row


def test_counters_are_consistent_per_set(bench):
    k = bench["results"]["num_speculative_tokens"]
    for row in bench["results"]["rows"]:
        assert row["num_drafts"] > 0
        assert row["num_draft_tokens"] == k * row["num_drafts"]
        assert 0 <= row["num_accepted_tokens"] <= row["num_draft_tokens"]
        assert row["mean_accept_length"] == pytest.approx(1 + row["num_accepted_tokens"] / row["num_drafts"])
        rates = row["per_position_accept_rate"]
        assert len(rates) == k and all(a >= b for a, b in zip(rates, rates[1:]))
        assert sum(rates) * row["num_drafts"] == pytest.approx(row["num_accepted_tokens"])
        # Each drafted step emits 1 + accepted tokens, so drafts can never exceed the output.
        assert row["num_drafts"] <= row["num_output_tokens"]
        assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
        # the one-stream pass: every prompt of the set (fewer than serve.single_stream_prompts), one at a time
        assert row["one_stream_output_tokens"] > 0 and row["one_stream_seconds"] > 0
        assert row["one_stream_output_tokens"] <= row["num_output_tokens"]
        assert row["one_stream_speedup"] == pytest.approx(
            row["one_stream_tokens_per_s"] / row["one_stream_baseline_tokens_per_s"])
    # An untrained draft is not a useful one.
    assert all(r["mean_accept_length"] < 1.3 for r in bench["results"]["rows"])


def test_results_files_and_model_card(bench):
    out = bench["out"]
    md = (out / "results.md").read_text()
    assert ("| draft | prompt set | n | mean accept length | draft accept rate | pos 1 | pos 2 | pos 3 | "
            "tok/s 1 stream (draft / alone) | speedup 1 stream | tok/s batch (draft / alone) | speedup batch |") in md
    assert (out / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean accept length" in bench["stdout"]
    results = bench["results"]
    assert results["format"] == "eaglecache.bench" and len(results["prompt_sets"]) == 3
    assert results["drafts"]["reduced"]["source"].startswith("untrained")
    assert all(len(s["sha256"]) == 64 for s in results["prompt_sets"])
    card = (bench["draft"] / "README.md").read_text()
    assert "Not measured yet" not in card and "| reduced | humaneval |" in card


def test_prometheus_text_and_snapshot_deltas_agree():
    text = """# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
vllm:spec_decode_num_drafts_total{engine="0",model_name="t"} 10.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="t"} 1.79e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="t"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="t"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="t",position="0"} 7.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="t",position="1"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="t",position="2"} 1.0
"""
    counters = counters_from_prometheus(text)
    assert counters == SpecCounters(10, 30, 12, [7, 4, 1])
    stats = (counters - SpecCounters(5, 15, 2, [2, 0, 0])).acceptance()
    assert stats["mean_accept_length"] == pytest.approx(1 + 10 / 5)
    assert stats["draft_accept_rate"] == pytest.approx(10 / 15)
    assert stats["per_position_accept_rate"] == pytest.approx([1.0, 0.8, 0.2])
    assert SpecCounters().acceptance()["mean_accept_length"] is None


def test_bad_prompt_files_and_mismatched_drafts_are_one_line_errors(tmp_path, capsys, tiny_target):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "assistant", "content": "no user"}]}\n')
    from eaglecache.errors import UserError

    with pytest.raises(UserError, match=r"bad.jsonl:2: messages have no user turn"):
        load_prompt_set(str(bad), tiny_target)
    with pytest.raises(UserError, match="not 'humaneval', 'sharegpt-heldout' or an existing JSONL"):
        load_prompt_set(str(tmp_path / "missing.jsonl"), tiny_target)

    draft = build_untrained_draft(tiny_target, tmp_path / "draft", seed=0)
    config = json.loads((draft / "config.json").read_text())
    config["vocab_size"] += 1
    (draft / "config.json").write_text(json.dumps(config))
    assert main(["bench", "--draft", str(draft), "--prompts", "humaneval", "--output", str(tmp_path / "o"),
                 f"target.path={tiny_target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not fit the target" in err and "\n" not in err


def test_drafts_benched_together_need_names_that_tell_them_apart(tmp_path, capsys, tiny_target):
    first = build_untrained_draft(tiny_target, tmp_path / "a" / "draft", seed=0)
    second = build_untrained_draft(tiny_target, tmp_path / "b" / "draft", seed=1)
    assert main(["bench", "--draft", str(first), str(second), "--prompts", "humaneval",
                 "--output", str(tmp_path / "o"), f"target.path={tiny_target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --draft: several drafts named draft; rows are labelled by directory name, "
                   "so give each draft its own")
    assert not (tmp_path / "o").exists()
