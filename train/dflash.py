"""The DFlash draft: a block of mask tokens drafted in one pass, attending to the target's context states.

vLLM 0.32 serves it as ``DFlashDraftModel`` (vllm/model_executor/models/qwen3_dflash.py, method
``dflash``), and this module computes what that forward computes, in its tensor names
(eaglecache/formats/draft.py ``tensor_shapes``):

- Context: each verified position j contributes the state ``c_j = hidden_norm(fc(aux_j))``; every
  layer projects it to a key and a value (its own k/v projections, the per-head ``k_norm``, RoPE at
  position j). Context states never pass through the layers.
- Block: at an anchor, the last verified token and ``ttt_length`` mask tokens, at the next positions,
  go through ``num_layers`` Qwen3 decoder layers (pre-norm, per-head q/k RMSNorm, SiLU MLP). A block's
  queries attend to the context keys before it and to all keys of the block (bidirectional), then the
  output norm; slot s >= 1 predicts the token s positions after the anchor's.

Training runs every position as an anchor at once. In the shifted batch (train/loader.py) the anchor
at t reads the token ``input_ids[t]`` (slot 0, position t + 1) with context keys 0..t, and its slot
k + 1 has the teacher and mask of TTT step k at t: the loss, its normalization and the greedy walk are
train/ttt.py's and train/loss.py's, unchanged. The walk is DFlash's acceptance rule exactly, since no
slot reads a drafted token.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from eaglecache.formats.draft import DraftArch
from eaglecache.train.draft import MLP, RMSNorm, Rotary, apply_rotary, check_format_names, init_from_format
from eaglecache.train.loss import LMHeadLoss
from eaglecache.train.metrics import decode_walk
from eaglecache.train.target_head import TargetHead
from eaglecache.train.ttt import TTTSettings, noisy_aux, step_weights


def _block_attention(q, ctx_k, ctx_v, k, v, first_anchor: int) -> torch.Tensor:
    """Anchors first_anchor.. of q [B, C, S, kv, group, d] (pre-scaled) over the context keys ctx_k/ctx_v
    [B, J, kv, d] (anchor t sees j <= t) and their own block's keys k/v [B, C, S, kv, d]."""
    anchors, num_keys = q.shape[1], ctx_k.shape[1]
    ctx_scores = torch.einsum("btsngd,bjnd->bngtsj", q, ctx_k)
    anchor_ids = first_anchor + torch.arange(anchors, device=q.device)
    visible = torch.arange(num_keys, device=q.device)[None, :] <= anchor_ids[:, None]  # [C, J]
    ctx_scores = ctx_scores.masked_fill(~visible[:, None, :], float("-inf"))
    block_scores = torch.einsum("btsngd,btund->bngtsu", q, k)
    scores = torch.cat([ctx_scores, block_scores], dim=-1)
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    return (torch.einsum("bngtsj,bjnd->btsngd", probs[..., :num_keys], ctx_v)
            + torch.einsum("bngtsu,btund->btsngd", probs[..., num_keys:], v))


class BlockAttention(nn.Module):
    """Qwen3 attention of the block's queries over the context keys before the anchor and the block's keys."""

    # score elements (batch x heads x anchors x slots x keys) computed at once: 2**25 is 128 MiB in fp32
    score_budget = 1 << 25

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
        hidden, q_out, kv_out = arch.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=False)
        self.k_proj = nn.Linear(hidden, kv_out, bias=False)
        self.v_proj = nn.Linear(hidden, kv_out, bias=False)
        self.o_proj = nn.Linear(q_out, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, N, H] at positions with tables cos/sin [N, d] -> k, v [B, N, kv, d] (k normed and rotated)."""
        batch, n, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(batch, n, self.num_kv_heads, self.head_dim))
        return apply_rotary(k, cos, sin), self.v_proj(x).view(batch, n, self.num_kv_heads, self.head_dim)

    def forward(self, x, context_kv, cos, sin):
        """x [B, T, S, H] (anchor t, slot s at position t + 1 + s; cos/sin [T, S, d]) -> [B, T, S, H]."""
        batch, length, slots, _ = x.shape
        flat = x.reshape(batch, length * slots, -1)
        cos_flat, sin_flat = cos.reshape(length * slots, -1), sin.reshape(length * slots, -1)
        q = self.q_norm(self.q_proj(flat).view(batch, length * slots, self.num_heads, self.head_dim))
        q = apply_rotary(q, cos_flat, sin_flat).view(batch, length, slots, self.num_heads, self.head_dim)
        k, v = (y.view(batch, length, slots, self.num_kv_heads, self.head_dim)
                for y in self.keys_values(flat, cos_flat, sin_flat))
        ctx_k, ctx_v = context_kv
        group = self.num_heads // self.num_kv_heads
        q = q.view(batch, length, slots, self.num_kv_heads, group, self.head_dim) / math.sqrt(self.head_dim)
        # anchors in chunks whose scores fit the budget; with gradients each chunk is recomputed in the
        # backward pass, so the scores of only one chunk exist at a time (exact, as one pass)
        chunk = max(1, self.score_budget // max(1, batch * self.num_heads * slots * length))
        outs = []
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            args = (q[:, start:stop], ctx_k[:, :stop], ctx_v[:, :stop], k[:, start:stop], v[:, start:stop], start)
            if torch.is_grad_enabled() and stop - start < length:
                outs.append(checkpoint(_block_attention, *args, use_reentrant=False))
            else:
                outs.append(_block_attention(*args))
        out = torch.cat(outs, dim=1)
        return self.o_proj(out.reshape(batch, length, slots, self.num_heads * self.head_dim))


class DFlashLayer(nn.Module):
    """vLLM's DFlashQwen3DecoderLayer: pre-norm attention and MLP, each with its residual."""

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = BlockAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, hidden, context_states, cos_ctx, sin_ctx, cos, sin):
        context_kv = self.self_attn.keys_values(context_states, cos_ctx, sin_ctx)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), context_kv, cos, sin)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DFlashDraft(nn.Module):
    """The trainable DFlash draft plus the frozen target head; ``forward`` returns the loss and stats."""

    def __init__(self, arch: DraftArch, target: TargetHead, settings: TTTSettings,
                 d2t: Optional[torch.Tensor] = None):
        super().__init__()
        if arch.family != "dflash" or arch.mask_token_id is None:
            raise ValueError("DFlashDraft needs a dflash architecture with a mask token")
        self.arch = arch
        self.settings = settings
        self.fc = nn.Linear(arch.aux_width, arch.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = Rotary(arch)
        self.target = target
        self.lm_head = LMHeadLoss(arch, target, d2t)
        check_format_names(self)

    def init_weights(self, seed: int) -> None:
        init_from_format(self, seed)

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """vLLM's ``combine_hidden_states`` for DFlash: fc alone (the norm comes with the context keys)."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def block_states(self, input_ids: torch.Tensor, aux: torch.Tensor, slots: int) -> torch.Tensor:
        """Post-norm states of every anchor's block, [B, T, slots, H]: slot 0 reads ``input_ids[t]``, the
        others the mask token; anchor t sees the context states 0..t."""
        batch, length = input_ids.shape
        context = self.hidden_norm(self.combine(aux.flatten(2)))
        cos_all, sin_all = self.rotary(length + slots, context)
        positions = torch.arange(length, device=context.device)[:, None] + 1 + torch.arange(slots, device=context.device)
        cos, sin = cos_all[positions], sin_all[positions]  # [T, S, d]
        mask_ids = torch.full_like(input_ids, self.arch.mask_token_id)
        ids = torch.stack([input_ids] + [mask_ids] * (slots - 1), dim=2)  # [B, T, S]
        hidden = self.target.embed(ids).to(self.fc.weight.dtype)
        for layer in self.layers:
            args = (hidden, context, cos_all[:length], sin_all[:length], cos, sin)
            if self.settings.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden = layer(*args)
        return self.norm(hidden)

    def forward(self, input_ids, loss_mask, aux, final):
        """Shifted batch -> (loss, stats [ttt_length, 7]) as train/ttt.py's ttt_loss: slot k + 1 is step k."""
        settings = self.settings
        aux = noisy_aux(aux, settings, self.training, self.fc.weight.dtype)
        states = self.block_states(input_ids, aux, settings.ttt_length + 1)
        masks, weights = step_weights(loss_mask, settings.ttt_length, settings.ttt_decay,
                                      settings.loss_mask_alignment)
        with torch.no_grad():
            teacher = self.target.final_norm(final)
        loss, stats, agree = self.lm_head(states[:, :, 1:].permute(2, 0, 1, 3).contiguous(), teacher, masks, weights,
                                          settings.loss_chunk_tokens, settings.lk_loss, settings.lk_eta)
        return loss, torch.cat([stats, decode_walk(agree, loss_mask).to(stats.device)], dim=1)
