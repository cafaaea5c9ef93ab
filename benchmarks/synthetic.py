"""Synthetic inputs of the training benchmarks (bench_train.py, bench_memory.py): a random target head and a cache.

A target directory with a Llama config.json and the three tensors the draft reads (embedding, final norm,
LM head), and a one-part Zarr cache of random features made by the project's own writer, so the trainer
runs end to end at sizes no real checkpoint on this machine has. Random numbers: for speed and memory
only, never for quality.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path


def make_target_and_cache(root: Path, *, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                          seq: int, num_samples: int, chunk_tokens: int, head_dtype: str = "float32",
                          max_positions: int = 4096) -> tuple[Path, Path]:
    """(target dir, cache dir) under ``root``: ``num_samples`` samples of ``seq`` tokens at hidden ``hidden``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from eaglecache.precompute.writer import PartWriter, create_or_check_cache
    from eaglecache.target import weights_hash

    target = root / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "num_hidden_layers": 16, "vocab_size": vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": max_positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}))
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, head_dtype)
    save_file({"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype),
               "model.norm.weight": torch.ones(hidden, dtype=dtype),
               "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype)},
              str(target / "model.safetensors"))
    meta = {"aux_layer_ids": [2, 8, 13], "final_layer_id": 16, "final_prenorm": True, "hidden_size": hidden,
            "vocab_size": vocab, "target_weights_hash": weights_hash(target), "dtype": "bfloat16", "codec": "zstd",
            "codec_level": 1, "chunk_tokens": chunk_tokens, "shard_tokens": 4 * seq, "num_parts": 1}
    cache = root / "cache"
    create_or_check_cache(cache, meta)
    writer = PartWriter(cache, 0, 1, meta)
    for sid in range(num_samples):
        writer.add(sid, torch.randint(0, vocab, (seq,), generator=gen).numpy().astype(np.int32),
                   np.ones(seq, np.uint8), torch.randn(seq, 3, hidden, generator=gen).to(torch.bfloat16),
                   torch.randn(seq, hidden, generator=gen).to(torch.bfloat16))
    writer.close()
    return target, cache


def free_port() -> int:
    """A TCP port nobody listens on now, for a child's single-rank rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
