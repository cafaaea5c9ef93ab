"""The tiny target's architecture: a small ``LlamaForCausalLM``, randomly initialised from a seed.

At least 8 layers so vLLM's default aux ids (2, L//2, L-3) are distinct, head size 64 (one
vLLM CPU supports), untied embeddings like the large targets the draft trainer is built for.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from eaglecache.tiny_target.spec import TinyTargetSpec


def llama_config(spec: TinyTargetSpec, bos_id: int, eos_id: int, pad_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["LlamaForCausalLM"],
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A float32 model whose initial weights depend only on ``config`` and ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def generation_config(config: LlamaConfig) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=256,
    )
