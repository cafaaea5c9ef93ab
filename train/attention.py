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


def _reduce_kv(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of ``_expand_kv`` for gradients: sum each group of query heads back into its KV head."""
    batch, num_heads, length, dim = grad.shape
    if kv_heads == num_heads:
        return grad
    return grad.view(batch, kv_heads, num_heads // kv_heads, length, dim).sum(dim=2)


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
    """Causal flash attention over step-0 keys, merged with the diagonal keys of steps 1..k."""

    @staticmethod
    def forward(ctx, q, num_steps, *kv):
        keys, values = kv[:num_steps], kv[num_steps:]
        num_heads, kv_heads, scale = q.shape[1], keys[0].shape[1], 1.0 / math.sqrt(q.shape[-1])
        k0, v0 = _expand_kv(keys[0], num_heads), _expand_kv(values[0], num_heads)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k0, v0, 0.0, True, scale=scale)
        extra_k = [_expand_kv(k, num_heads) for k in keys[1:]]
        extra_v = [_expand_kv(v, num_heads) for v in values[1:]]
        if extra_k:
            acc = _accumulation_dtype(q)  # fp32 (or wider), like the kernel's log-sum-exp
            scores = [torch.einsum("bhtd,bhtd->bht", q.to(acc), k.to(acc)) * scale for k in extra_k]
            merged_lse = torch.logsumexp(torch.stack([lse.to(acc), *scores]), dim=0)
            merged = out.to(acc) * torch.exp(lse - merged_lse)[..., None]
            for score, v in zip(scores, extra_v):
                merged += torch.exp(score - merged_lse)[..., None] * v.to(acc)
            out, lse = merged.to(q.dtype), merged_lse
        ctx.save_for_backward(q, k0, v0, out, lse, *extra_k, *extra_v)
        ctx.num_extra, ctx.kv_heads, ctx.scale = len(extra_k), kv_heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k0, v0, out, lse, *extra = ctx.saved_tensors
        extra_k, extra_v = extra[:ctx.num_extra], extra[ctx.num_extra:]
        grad_out = grad_out.contiguous()
        # Given the merged output and log-sum-exp, the kernel's P = exp(QK^T*s - lse) and
        # D = rowsum(dO * O) are those of the merged softmax restricted to the causal keys.
        grad_q, grad_k0, grad_v0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k0, v0, out, lse, 0.0, True, scale=ctx.scale)
        grad_keys, grad_values = [_reduce_kv(grad_k0, ctx.kv_heads)], [_reduce_kv(grad_v0, ctx.kv_heads)]
        if extra_k:
            acc = _accumulation_dtype(q)
            dout, qf = grad_out.to(acc), q.to(acc)
            delta = (dout * out.to(acc)).sum(-1)
            grad_q = grad_q.to(acc)
            for k, v in zip(extra_k, extra_v):
                prob = torch.exp(torch.einsum("bhtd,bhtd->bht", qf, k.to(acc)) * ctx.scale - lse)
                dscore = prob * ((dout * v.to(acc)).sum(-1) - delta) * ctx.scale
                grad_q += dscore[..., None] * k.to(acc)
                grad_keys.append(_reduce_kv((dscore[..., None] * qf).to(k.dtype), ctx.kv_heads))
                grad_values.append(_reduce_kv((prob[..., None] * dout).to(v.dtype), ctx.kv_heads))
            grad_q = grad_q.to(q.dtype)
        return (grad_q, None, *grad_keys, *grad_values)


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
