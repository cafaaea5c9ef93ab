"""train/memory.py's arithmetic against figures worked out by hand for a small draft, and `eaglecache plan`
printing the training-memory table for the seed's config (a MiniMax-M3-sized text config.json stand-in)."""

import json
import math
from pathlib import Path

import pytest

from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.train import memory

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "configs/minimax_m3/config.yaml"
# a small text config with the seed's shape: 60 layers (aux 2/30/57), GQA, untied head
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "num_hidden_layers": 60, "vocab_size": 512, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": False}
# MiniMax-M3's text dims as the README's table assumes them (hidden and vocab from the seed's config)
M3 = {**SMALL, "hidden_size": 6144, "intermediate_size": 9216, "num_attention_heads": 64, "num_key_value_heads": 8,
      "head_dim": 128, "vocab_size": 200064, "max_position_embeddings": 32768}


def test_rows_match_the_hand_computed_bytes():
    # the seed's train settings: bf16, TTT 7, micro-batch 1, checkpointing, loss chunks of 2048; 4 ranks, T 1000
    m = memory.memory_inputs(load_config(str(SEED)), SMALL, 4)
    # P: fc 64x192, q 64x128, k and v 32x128, o 64x64, gate and up 128x64, down 64x128, four norms of 64
    assert m.params == 12288 + 8192 + 2 * 4096 + 4096 + 2 * 8192 + 8192 + 4 * 64 == 57600
    rows = {row.name: row.nbytes for row in memory.gpu_rows(m, 1000)}
    assert rows["frozen embedding + LM head"] == 2 * 512 * 64 * 2  # embedding and LM head, bf16, on every rank
    assert rows["draft states (ZeRO-3 shard)"] == 14400 * (2 + 4 + 8 + 2)  # bf16 param + fp32 master + Adam + grad
    assert rows["draft gathered for fwd/bwd"] == 57600 * 2
    assert rows["gradient reduce bucket"] == 500_000_000 * 2
    assert rows["micro-batch"] == 1000 * (8 + 1 + 2 * 4 * 64)  # id, mask, 3 aux + final bf16 states
    # kept per token: fc out 128; normed embeds twice 256 and their q/k/v 256; 7 steps of state 128 + k/v 128;
    # 7 output norms of fp32 copy 256 + bf16 128; the loss gradient 7 x 128 and the step masks/weights 7 x 9
    assert rows["kept across TTT 7"] == 1000 * (128 + 512 + 7 * 256 + 7 * 384 + 7 * 128 + 63)
    # loss forward: normed states twice and the teacher (15 x 128 per token); one chunk of the whole 1000
    # positions: teacher probs (4 B), this and the previous step's fp32 logits and vecdot's product (12 B)
    assert rows["peak working set"] == 1000 * 15 * 128 + 512 * (4 * 1000 + 12 * 1000)


def test_fp32_and_more_ranks_change_what_they_should():
    config = load_config(str(SEED), ["train.dtype=float32"])
    m = memory.memory_inputs(config, SMALL, 8)
    rows = {row.name: row.nbytes for row in memory.gpu_rows(m, 1000)}
    assert rows["draft states (ZeRO-3 shard)"] == 7200 * (4 + 8 + 4)  # DeepSpeed reuses the fp32 partition
    assert rows["frozen embedding + LM head"] == 2 * 512 * 64 * 4
    assert memory.memory_inputs(load_config(str(SEED)), SMALL, 8).accumulation == 4  # 32 / (1 x 8)
    assert memory.loader_micro_batches(memory.memory_inputs(load_config(str(SEED)), SMALL, 8)) == 5 * 4 - 1


def test_the_longest_fitting_sequence_is_the_boundary():
    m = memory.memory_inputs(load_config(str(SEED)), M3, 32)
    budget = 72 * memory.GIB
    longest = memory.longest_fitting(m, budget)
    assert longest % 1024 == 0 and memory.total_bytes(m, longest) <= budget < memory.total_bytes(m, longest + 1024)


@pytest.fixture
def m3_target(tmp_path):
    """A directory with MiniMax-M3's VL config.json layout (text config inside), no weights."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MiniMaxVL01ForConditionalGeneration"],
                                                      "text_config": M3}))
    return tmp_path


def _row(out: str, key: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(key)).split()


def test_plan_prints_the_memory_table(capsys, m3_target):
    assert main(["plan", "--config", str(SEED), "--num-samples", "1000", "--mean-tokens", "4096",
                 f"target.path={m3_target}", "--gpus", "8", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "training memory per GPU: 8 ranks (N) x 80 GiB, sequence T 32,768" in out
    assert float(_row(out, "frozen embedding + LM head")[5]) == round(2 * 200064 * 6144 * 2 / 2**30, 2)
    params = int(_row(out, "draft P")[2].replace(",", ""))
    assert float(_row(out, "draft states")[4]) == round(math.ceil(params / 8) * 16 / 2**30, 2)
    names = ("frozen embedding", "draft states", "gradient reduce", "micro-batch", "draft gathered", "kept across",
             "peak working set")
    printed = [float(next(w for w in _row(out, name) if w.replace(".", "").isdigit() and "." in w))
               for name in names]
    assert abs(float(_row(out, "total")[1]) - sum(printed)) <= 0.01 * len(names)  # rows add up to the total
    assert _row(out, "longest sequence that fits")[4] != "0"
    assert "loader buffers (host, pinned)" in out


def test_plan_without_the_target_config_says_so(capsys):
    assert main(["plan", "--config", str(SEED), "--num-samples", "10", "--mean-tokens", "10",
                 "--hidden-size", "6144", "--num-layers", "60", "target.path=/nonexistent/m3"]) == 0
    assert "training memory per GPU: not computed" in capsys.readouterr().out
