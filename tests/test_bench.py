"""`eaglecache bench` on the tiny target in vLLM: lossless greedy decoding, consistent counters, the outputs.

One bench run is shared by the module: the target alone, then with a draft of reduced draft vocab (its own
LM head and `data vocab`'s d2t/t2d) over three prompt sets. The draft is built to accept without training
(``repeat_draft``: it proposes the token it was given again, so it is accepted wherever the target repeats a
token, through the reduced vocab's id mapping), so the acceptance counters are checked with non-zero counts;
the same checks run on the demo's trained draft (test_demo.py). Full-vocab drafts run in test_serve.py.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from eaglecache.cli import main
from eaglecache.formats.vocab import read_vocab
from eaglecache.serve.export import build_untrained_draft
from eaglecache.serve.metrics import SpecCounters, counters_from_prometheus
from eaglecache.serve.prompts import load_prompt_set
from eaglecache.target import target_layer_count

NUM_PROMPTS = 3
SETTINGS = [f"serve.max_prompts={NUM_PROMPTS}", "serve.max_new_tokens=24", "target.kv_cache_gib=0.25",
            "serve.num_speculative_tokens=3"]
DRAFT_VOCAB = 1024


def repeat_draft(tiny_target, output, vocab_path):
    """An EAGLE3 draft whose first step is the target's own last layer: fc passes through the state entering
    that layer (aux id L-1), the midlayer holds the layer's weights (q/k/v reading the state, not the
    embedding) and the draft's norm and LM head are the target's, the head's rows those of the draft vocab
    at ``vocab_path`` (`data vocab`'s d2t/t2d). At position t EAGLE3 reads the token of t + 1 and must
    propose the one after it; this draft proposes what the target predicted at t, i.e. the token it was
    given: it is accepted exactly where the target repeats a token (checked against vLLM's drafter forward
    while writing this test: its state is the target's final one)."""
    d2t, t2d, _ = read_vocab(vocab_path)
    draft_vocab_size = len(d2t)
    num_layers = target_layer_count(tiny_target)
    last = num_layers - 1
    draft = build_untrained_draft(tiny_target, output, seed=0, draft_vocab_size=draft_vocab_size,
                                  aux_layer_ids=[num_layers - 3, num_layers - 2, last])
    tensors = load_file(str(draft / "model.safetensors"))
    dtype = tensors["fc.weight"].dtype
    target = {}
    for path in sorted(tiny_target.glob("*.safetensors")):
        target.update(load_file(str(path)))
    layer = {name.removeprefix(f"model.layers.{last}."): t for name, t in target.items()
             if name.startswith(f"model.layers.{last}.")}
    hidden = target["model.norm.weight"].shape[0]
    fc = torch.zeros(hidden, 3 * hidden)
    fc[:, 2 * hidden:] = torch.eye(hidden)
    tensors["fc.weight"] = fc
    for name in ("q_proj", "k_proj", "v_proj"):  # [embedding, state] inputs: the embedding half is zero
        weight = layer[f"self_attn.{name}.weight"]
        tensors[f"midlayer.self_attn.{name}.weight"] = torch.cat([torch.zeros_like(weight), weight], dim=1)
    tensors["midlayer.hidden_norm.weight"] = layer["input_layernorm.weight"]
    for name in ("self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        tensors[f"midlayer.{name}.weight"] = layer[f"{name}.weight"]
    tensors["norm.weight"] = target["model.norm.weight"]
    head = target.get("lm_head.weight", target["model.embed_tokens.weight"])
    tensors["lm_head.weight"] = head[torch.arange(draft_vocab_size) + torch.from_numpy(d2t)]
    tensors["d2t"], tensors["t2d"] = torch.from_numpy(d2t), torch.from_numpy(t2d)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
              str(draft / "model.safetensors"), metadata={"format": "pt"})
    return draft


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_target, tiny_dataset):
    root = tmp_path_factory.mktemp("bench")
    assert main(["data", "vocab", "--data", str(tiny_dataset), "--output", str(root / "vocab.safetensors"),
                 f"target.path={tiny_target}", f"data.draft_vocab_size={DRAFT_VOCAB}"]) == 0
    draft = repeat_draft(tiny_target, root / "repeat", root / "vocab.safetensors")
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
        ("repeat", name) for name in ("humaneval", "sharegpt-heldout", "mine")]
    for row in rows:
        # A departure is only excused where the target's own top two log-probs tie (bf16): see bench.TIE_NATS.
        assert row["n"] > 0 and row["identical_to_target"] + row["departures_at_ties"] == row["n"], row


def check_counters(row: dict, k: int) -> None:
    """One row's acceptance counters agree with each other and with the output (test_demo.py uses it too)."""
    assert row["num_drafts"] > 0
    assert row["num_draft_tokens"] == k * row["num_drafts"]
    assert 0 <= row["num_accepted_tokens"] <= row["num_draft_tokens"]
    assert row["mean_accept_length"] == pytest.approx(1 + row["num_accepted_tokens"] / row["num_drafts"])
    rates = row["per_position_accept_rate"]
    assert len(rates) == k and all(a >= b for a, b in zip(rates, rates[1:]))  # a draft is accepted as a prefix
    assert sum(rates) * row["num_drafts"] == pytest.approx(row["num_accepted_tokens"])
    # A verify step emits its accepted tokens plus one; the prefill one token per prompt; the last step's
    # tokens may be cut at max_new_tokens. So drafts <= output <= prompts + drafts + accepted.
    assert row["num_drafts"] <= row["num_output_tokens"] <= row["n"] + row["num_drafts"] + row["num_accepted_tokens"]
    assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0
    # the one-stream pass: the first prompts of the set (serve.single_stream_prompts), one at a time
    assert row["one_stream_output_tokens"] > 0 and row["one_stream_seconds"] > 0
    assert row["one_stream_output_tokens"] <= row["num_output_tokens"]
    assert row["one_stream_speedup"] == pytest.approx(
        row["one_stream_tokens_per_s"] / row["one_stream_baseline_tokens_per_s"])


def test_counters_are_consistent_per_set(bench):
    k = bench["results"]["num_speculative_tokens"]
    rows = bench["results"]["rows"]
    for row in rows:
        check_counters(row, k)
    # the repeat draft is accepted at every position somewhere (the target's greedy outputs repeat tokens)
    assert all(sum(r["per_position_accept_rate"][i] for r in rows) > 0 for i in range(k)), rows


def test_results_files_and_model_card(bench):
    out = bench["out"]
    md = (out / "results.md").read_text()
    assert ("| draft | prompt set | n | mean accept length | draft accept rate | pos 1 | pos 2 | pos 3 | "
            "tok/s 1 stream (draft / alone) | speedup 1 stream | tok/s batch (draft / alone) | speedup batch |") in md
    assert (out / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean accept length" in bench["stdout"]
    results = bench["results"]
    assert results["format"] == "eaglecache.bench" and len(results["prompt_sets"]) == 3
    assert results["drafts"]["repeat"]["source"].startswith("untrained")  # its provenance: built, not trained
    assert all(len(s["sha256"]) == 64 for s in results["prompt_sets"])
    card = (bench["draft"] / "README.md").read_text()
    assert "Not measured yet" not in card and "| repeat | humaneval |" in card


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
