"""TTT attention: step k's queries see the causal step-0 keys plus the keys of steps 1..k at the same position.

At TTT step k the query at position t attends to

- the step-0 keys at positions 0..t (ordinary causal attention), and
- the keys that steps 1..k produced at position t itself (one "diagonal" key per earlier step).

Three implementations, one contract (``q`` [B, heads, T, d]; ``keys``/``values`` lists of
[B, kv_heads, T, d], entry j made by step j, entry 0 the step-0 keys):

- ``reference``: plain SDPA over the concatenated keys [K0; K1; ...; Kk] with an explicit
  boolean mask. Runs everywhere, backward included; the ground truth for the others.
- ``split``: the causal part by the fused flash kernel (no mask, skips the upper triangle),
  the k diagonal keys by elementwise products, merged exactly through the log-sum-exp. The
  backward reuses the flash backward kernel given the MERGED output and log-sum-exp: with
  those it yields exactly the causal keys' share of the merged softmax's gradient, and the
  diagonal keys' share is written out below. CPU only (the CPU flash op).
- ``flex``: FlexAttention with a block mask over the concatenated keys. CUDA only (torch 2.13
  has no FlexAttention backward on CPU); its forward is checked against the reference on CPU.

Fused kernels for this mask have shipped wrong gradients in other trainers: tests compare
every path with ``reference``, gradients included (tests/test_ttt_attention.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("reference", "split", "flex")


def resolve_implementation(name: str, device: torch.device) -> str:
    """``auto`` -> ``split`` on CPU, ``flex`` on CUDA; a named one is checked against the device."""
    if name == "auto":
        return "flex" if device.type == "cuda" else "split"
    if name == "split" and device.type != "cpu":
        raise ValueError("attention 'split' uses the CPU flash kernel; use 'flex' or 'reference' on CUDA")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown TTT attention {name!r} (expected auto, {', '.join(IMPLEMENTATIONS)})")
    return name


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  implementation: str = "reference") -> torch.Tensor:
    """Attention of step ``len(keys) - 1``; returns [B, heads, T, d]. Scale is 1/sqrt(d)."""
    if implementation == "split":
        return _SplitCausalAttention.apply(q, len(keys), *keys, *values)
    if implementation == "flex":
        return _flex_attention(q, keys, values)
    return _reference_attention(q, keys, values)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, kv_heads, T, d] -> [B, heads, T, d], each KV head repeated for its group of query heads."""
    batch, kv_heads, length, dim = x.shape
    if kv_heads == num_heads:
        return x
    groups = num_heads // kv_heads
    return x[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, num_heads, length, dim)


@functools.lru_cache(maxsize=64)
def ttt_mask(length: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """Boolean [T, T * num_steps] mask over [K0; K1; ...]: causal on block 0, diagonal on the others."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(length * num_steps, device=device)[None, :]
    block, pos = cols // length, cols % length
    return ((block == 0) & (pos <= rows)) | ((block > 0) & (pos == rows))


def _reference_attention(q, keys, values):
    num_heads, length = q.shape[1], q.shape[2]
    key = _expand_kv(torch.cat(keys, dim=2), num_heads)
    value = _expand_kv(torch.cat(values, dim=2), num_heads)
    return F.scaled_dot_product_attention(q, key, value, attn_mask=ttt_mask(length, len(keys), q.device))


class _SplitCausalAttention(torch.autograd.Function):
    """Causal flash attention over step-0 keys, merged with the diagonal keys of steps 1..k.

    The diagonal part is batched: per (batch, position, KV head), the group of query
    heads [g, d] meets the k diagonal keys [k, d] in one small matmul, in fp32. Work is
    laid out [B, T, kv_heads, ...], the memory order of the projections and of the
    flash kernel's output, so no head expansion or transpose copies are needed (GQA
    included: the kernel itself takes fewer KV heads).
    """

    @staticmethod
    def forward(ctx, q, num_steps, *kv):
        keys, values = kv[:num_steps], kv[num_steps:]
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys[0], values[0], 0.0, True, scale=scale)
        if num_steps > 1:
            kv_heads, acc = keys[0].shape[1], _accumulation_dtype(q)
            extra_k, extra_v = _stack_extra(keys[1:], acc), _stack_extra(values[1:], acc)
            scores = _by_position(q, kv_heads).to(acc) @ extra_k.transpose(-1, -2) * scale  # [B, T, kv, g, k]
            causal_lse = _by_position(lse, kv_heads).to(acc)  # [B, T, kv, g]
            merged_lse = torch.logaddexp(causal_lse, torch.logsumexp(scores, dim=-1))
            probs = torch.exp(scores - merged_lse[..., None])
            merged = _by_position(out, kv_heads).to(acc) * torch.exp(causal_lse - merged_lse)[..., None]
            merged = torch.baddbmm(merged.flatten(0, 2), probs.flatten(0, 2), extra_v.flatten(0, 2)).view(merged.shape)
            out = _by_head(merged, q.dtype)
            lse = _by_head(merged_lse, lse.dtype)
        ctx.save_for_backward(q, out, lse, *keys, *values)
        ctx.num_steps, ctx.scale = num_steps, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        keys, values = kv[:ctx.num_steps], kv[ctx.num_steps:]
        # Given the merged output and log-sum-exp, the kernel's P = exp(QK^T*s - lse) and
        # D = rowsum(dO * O) are those of the merged softmax restricted to the causal keys.
        grad_q, grad_k0, grad_v0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, keys[0], values[0], out, lse, 0.0, True, scale=ctx.scale)
        if ctx.num_steps == 1:
            return grad_q, None, grad_k0, grad_v0
        kv_heads, acc = keys[0].shape[1], _accumulation_dtype(q)
        extra_k, extra_v = _stack_extra(keys[1:], acc), _stack_extra(values[1:], acc)
        qp, dout = _by_position(q, kv_heads).to(acc), _by_position(grad_out, kv_heads).to(acc)
        delta = torch.linalg.vecdot(dout, _by_position(out, kv_heads).to(acc))  # [B, T, kv, g]
        probs = torch.exp(qp @ extra_k.transpose(-1, -2) * ctx.scale - _by_position(lse, kv_heads)[..., None])
        dscores = probs * (dout @ extra_v.transpose(-1, -2) - delta[..., None]) * ctx.scale  # [B, T, kv, g, k]
        grad_q = grad_q + _by_head(dscores @ extra_k, q.dtype)
        grad_extra_k = dscores.transpose(-1, -2) @ qp  # [B, T, kv, k, d]
        grad_extra_v = probs.transpose(-1, -2) @ dout
        grad_keys = [grad_k0] + [grad_extra_k[:, :, :, j].transpose(1, 2).to(k.dtype)
                                 for j, k in enumerate(keys[1:])]
        grad_values = [grad_v0] + [grad_extra_v[:, :, :, j].transpose(1, 2).to(v.dtype)
                                   for j, v in enumerate(values[1:])]
        return (grad_q, None, *grad_keys, *grad_values)


def _by_position(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, T, ...] -> [B, T, kv_heads, group, ...] (query heads by the KV head they share)."""
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], kv_heads, x.shape[2] // kv_heads, *x.shape[3:])


def _by_head(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_by_position``: [B, T, kv, g, ...] -> [B, heads, T, ...]."""
    return x.to(dtype).flatten(2, 3).transpose(1, 2)


def _stack_extra(tensors, dtype) -> torch.Tensor:
    """Diagonal keys (or values) of steps 1..k, each [B, kv, T, d] -> [B, T, kv, k, d]."""
    return torch.stack([t.transpose(1, 2).to(dtype) for t in tensors], dim=3)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(length: int, num_steps: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, q_idx, kv_idx):
        block, pos = kv_idx // length, kv_idx % length
        return ((block == 0) & (pos <= q_idx)) | ((block > 0) & (pos == q_idx))

    return create_block_mask(mask_mod, None, None, length, length * num_steps, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, keys, values):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _flex_block_mask(q.shape[2], len(keys), str(q.device))
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), block_mask=block_mask,
                  enable_gqa=q.shape[1] != keys[0].shape[1])
