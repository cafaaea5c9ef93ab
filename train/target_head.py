"""The target's frozen embedding, final norm and LM head, read straight from its safetensors by name.

The draft shares these three with the target (as the seed does) and never trains
them. Only these tensors are read, never the decoder layers: for MiniMax-M3 the
whole checkpoint is hundreds of GB, these three about 5 GB. Names are looked up
under ``target.weights_prefix`` (``language_model.`` for MiniMax-M3's VL
checkpoint), in sharded checkpoints through ``model.safetensors.index.json``
(the reading itself is ``eaglecache.target.read_head_tensors``).

They are kept as non-persistent buffers, not parameters: ZeRO-3 would partition
frozen parameters too and gather them at every use, while buffers stay whole on
every rank and never enter checkpoints or the exported weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from eaglecache.errors import UserError
from eaglecache.target import read_head_tensors, target_config


def read_target_head(target_dir: str | Path, weights_prefix: str = "") -> dict[str, torch.Tensor]:
    """``embed`` [V, H], ``norm`` [H] and ``lm_head`` [V, H] of the target (the embedding when tied)."""
    head = read_head_tensors(target_dir, weights_prefix)
    embed, norm, lm_head = head["embed"], head["norm"], head["lm_head"]
    if lm_head is None:
        if not target_config(target_dir).get("tie_word_embeddings", False):
            raise UserError(f"target {target_dir}: no {weights_prefix}lm_head.weight and embeddings are not tied")
        lm_head = embed
    if embed.shape != lm_head.shape or norm.shape != (embed.shape[1],):
        raise UserError(f"target {target_dir}: embedding {tuple(embed.shape)}, LM head {tuple(lm_head.shape)} "
                        f"and norm {tuple(norm.shape)} do not fit together")
    return {"embed": embed, "norm": norm, "lm_head": lm_head}


class TargetHead(nn.Module):
    """Frozen target embedding, final RMSNorm and LM head (buffers, cast to the training dtype)."""

    def __init__(self, embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.register_buffer("embed_weight", embed.to(dtype), persistent=False)
        self.register_buffer("norm_weight", norm.to(dtype), persistent=False)
        shared = lm_head.data_ptr() == embed.data_ptr()
        self.register_buffer("lm_head_weight", self.embed_weight if shared else lm_head.to(dtype),
                             persistent=False)

    @classmethod
    def from_target(cls, target_dir: str | Path, weights_prefix: str = "",
                    dtype: torch.dtype = torch.float32) -> "TargetHead":
        tensors = read_target_head(target_dir, weights_prefix)
        eps = float(target_config(target_dir).get("rms_norm_eps", 1e-6))
        return cls(tensors["embed"], tensors["norm"], tensors["lm_head"], eps, dtype)

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_weight)

    def final_norm(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The target's final RMSNorm on its pre-norm last-layer output, in the buffers' dtype."""
        return rms_norm(final_hidden.to(self.norm_weight.dtype), self.norm_weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm as vLLM and HF compute it: normalise in fp32 (or wider), cast back, then scale."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = wide.pow(2).mean(-1, keepdim=True)
    return (wide * torch.rsqrt(variance + eps)).to(x.dtype) * weight
