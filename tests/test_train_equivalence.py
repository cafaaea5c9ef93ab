"""(a) Training from the Zarr cache and from the same features in memory is bit-identical (losses and weights).

Runs the real trainer (DeepSpeed ZeRO-3, world size 1, gloo on CPU) in this
process on the embedded tiny target's frozen head, with random features of its
width written by precompute's own cache writer. Also checks the final weights
file against the format (vLLM names, bf16, trainable tensors only).
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import random_feature_samples, write_cache_parts
from eaglecache.config import load_config
from eaglecache.formats.cache_reader import open_cache
from eaglecache.target import target_config, weights_hash
from eaglecache.train.loader import InMemoryFeatures

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls

EXPECTED_TENSORS = {
    "fc.weight", "norm.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight", "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight",
}


def feature_samples(target_dir, num=12, seed=0, min_len=12, max_len=40):
    """Random features of the target's width (the trainer only needs their shapes to be right)."""
    cfg = target_config(target_dir)
    return random_feature_samples(num, hidden=cfg["hidden_size"], vocab=cfg["vocab_size"], seed=seed,
                                  min_len=min_len, max_len=max_len, final_scale=3)


def write_feature_cache(path, samples, target_dir, num_parts=2):
    cfg = target_config(target_dir)
    meta = {"aux_layer_ids": [2, 4, 5], "final_layer_id": cfg["num_hidden_layers"], "final_prenorm": True,
            "hidden_size": cfg["hidden_size"], "vocab_size": cfg["vocab_size"],
            "target_weights_hash": weights_hash(target_dir), "dataset_hash": "random-features",
            "dtype": "bfloat16", "codec": "zstd", "codec_level": 1, "chunk_tokens": 16, "shard_tokens": 100,
            "num_parts": num_parts}
    return write_cache_parts(path, samples, meta)


TINY_RUN = ["train.dtype=float32", "train.global_batch_size=2", "train.micro_batch_size=1",
            "train.max_seq_length=32", "train.ttt_length=3", "train.lr=3e-3", "train.warmup_ratio=0.0",
            "train.log_interval=1", "train.checkpoint_interval=2", "train.loader_workers=1", "train.epochs=1"]


def fp32_weights(run_dir, step=None):
    """The fp32 master weights of a checkpoint (the last by default), consolidated from ZeRO-3 partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from eaglecache.formats.run import committed_steps, tag_of

    tag = tag_of(step or committed_steps(run_dir)[-1])
    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cache_and_memory_train_bit_identically(tmp_path, tiny_target, single_rank):
    from eaglecache.train.main import train

    rank, world, device = single_rank
    samples = feature_samples(tiny_target)
    cache = open_cache(write_feature_cache(tmp_path / "cache", samples, tiny_target))
    memory = InMemoryFeatures(samples, cache.metadata)
    config = load_config(None, TINY_RUN)
    runs = {}
    for name, source in (("cache", cache), ("memory", memory)):
        run_dir = tmp_path / f"run-{name}"
        run_dir.mkdir()
        train(config, run_dir, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
        runs[name] = run_dir
    assert len(losses(runs["cache"])) == 6  # 12 samples / global batch 2, one epoch
    assert losses(runs["cache"]) == losses(runs["memory"])  # bit-identical floats
    weights_cache, weights_memory = fp32_weights(runs["cache"]), fp32_weights(runs["memory"])
    earlier = fp32_weights(runs["cache"], step=4)
    assert max((weights_cache[n] - earlier[n]).abs().max().item() for n in earlier) > 1e-3  # it did train
    assert set(weights_cache) == EXPECTED_TENSORS
    for name in weights_cache:
        assert torch.equal(weights_cache[name], weights_memory[name]), name

    # the final weights file: vLLM names, bf16, trainable tensors only, architecture beside it
    final = runs["cache"] / "final"
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == EXPECTED_TENSORS
        fc = f.get_tensor("fc.weight")
    assert fc.dtype == torch.bfloat16 and torch.equal(fc, weights_cache["fc.weight"].to(torch.bfloat16))
    arch = json.loads((final / "draft.json").read_text())
    tcfg = target_config(tiny_target)
    assert arch["aux_layer_ids"] == [2, 4, 5] and arch["hidden_size"] == tcfg["hidden_size"]
    assert arch["draft_vocab_size"] == arch["vocab_size"] == tcfg["vocab_size"]
    rope = [k for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in tcfg]
    assert rope and all(arch[k] == tcfg[k] for k in rope)  # RoPE copied from the target
    records = [json.loads(line) for line in (runs["cache"] / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["acc_0"] <= 1.0 and r["accept_len_3"] >= 1.0 for r in records)
    assert list((runs["cache"] / "tb").iterdir())


def test_reduced_vocab_trains_its_own_head_and_checkpointing_changes_nothing(tmp_path, tiny_target, single_rank):
    from eaglecache.data.vocab import save_vocab, select_draft_vocab
    from eaglecache.serve.export import select_draft_tensors, vllm_draft_config
    from eaglecache.train.main import train

    rank, world, device = single_rank
    samples = feature_samples(tiny_target, num=8)
    cfg = target_config(tiny_target)
    memory = InMemoryFeatures(samples, {"aux_layer_ids": [2, 4, 5], "hidden_size": cfg["hidden_size"],
                                        "vocab_size": cfg["vocab_size"]})
    counts = np.zeros(cfg["vocab_size"], dtype=np.int64)
    for s in samples:
        np.add.at(counts, s.input_ids[s.loss_mask.astype(bool)], 1)
    d2t, t2d = select_draft_vocab(counts, 256)
    save_vocab(tmp_path / "vocab.safetensors", d2t, t2d, {"draft_vocab_size": 256})
    runs = {}
    for checkpointing in (False, True):
        run_dir = tmp_path / f"run-{checkpointing}"
        run_dir.mkdir()
        config = load_config(None, TINY_RUN + [f"train.gradient_checkpointing={str(checkpointing).lower()}"])
        train(config, run_dir, memory, target_dir=tiny_target, vocab_path=str(tmp_path / "vocab.safetensors"),
              rank=rank, world_size=world, device=device)
        runs[checkpointing] = run_dir
    assert losses(runs[False]) == losses(runs[True])
    plain, recomputed = fp32_weights(runs[False]), fp32_weights(runs[True])
    assert set(plain) == EXPECTED_TENSORS | {"lm_head.weight"}
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain)
    with safe_open(str(runs[False] / "final" / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert tensors["lm_head.weight"].shape == (256, cfg["hidden_size"])
    assert torch.equal(tensors["d2t"], torch.from_numpy(d2t)) and torch.equal(tensors["t2d"], torch.from_numpy(t2d))
    arch = json.loads((runs[False] / "final" / "draft.json").read_text())
    assert arch["draft_vocab_size"] == 256
    # the export stage accepts exactly this file for a reduced-vocab draft
    exported = select_draft_tensors(tensors, vllm_draft_config(arch))
    assert {"lm_head.weight", "d2t"} <= set(exported)
