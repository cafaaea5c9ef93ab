"""TTT attention: step k's queries see the causal step-0 keys plus the keys of steps 1..k at the same position.

At TTT step k the query at position t attends to

- the step-0 keys at positions 0..t (ordinary causal attention), and
- the keys that steps 1..k produced at position t itself (one "diagonal" key per earlier step).

Three implementations, one contract: ``q`` [B, heads, T, d] and a ``KeyCache`` holding the
keys/values [B, kv_heads, T, d] of steps 0..k (entry j made by step j, entry 0 the step-0 keys):

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
from typing import NamedTuple

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


class KeyCache(NamedTuple):
    """The keys and values TTT steps 0..k made, which step k (and later ones) attend to.

    ``split`` also keeps the diagonal ones (steps >= 1) as [B, T, kv_heads, d] in fp32,
    converted once when the step adds them (autograd-tracked), not at every later step.
    """

    keys: tuple = ()
    values: tuple = ()
    wide_keys: tuple = ()
    wide_values: tuple = ()

    def append(self, key: torch.Tensor, value: torch.Tensor, implementation: str) -> "KeyCache":
        wide_keys, wide_values = self.wide_keys, self.wide_values
        if implementation == "split" and self.keys:
            acc = _accumulation_dtype(key)
            wide_keys += (key.transpose(1, 2).to(acc),)
            wide_values += (value.transpose(1, 2).to(acc),)
        return KeyCache(self.keys + (key,), self.values + (value,), wide_keys, wide_values)


def ttt_attention(q: torch.Tensor, cache: KeyCache, implementation: str = "reference") -> torch.Tensor:
    """Attention of step ``len(cache.keys) - 1``; returns [B, heads, T, d]. Scale is 1/sqrt(d)."""
    if implementation == "split":
        extra_k = torch.stack(cache.wide_keys, dim=3) if cache.wide_keys else None
        extra_v = torch.stack(cache.wide_values, dim=3) if cache.wide_values else None
        return _SplitCausalAttention.apply(q, cache.keys[0], cache.values[0], extra_k, extra_v)
    if implementation == "flex":
        return _flex_attention(q, list(cache.keys), list(cache.values))
    return _reference_attention(q, list(cache.keys), list(cache.values))


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
    heads [g, d] meets the k diagonal keys [k, d] (``extra_k`` [B, T, kv, k, d], fp32) in
    one small matmul. Work is laid out [B, T, kv_heads, ...], the memory order of the
    projections and of the flash kernel's output, so no head expansion or transpose
    copies are needed (GQA included: the kernel itself takes fewer KV heads).
    """

    @staticmethod
    def forward(ctx, q, k0, v0, extra_k, extra_v):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k0, v0, 0.0, True, scale=scale)
        ctx.scale, ctx.has_extra = scale, extra_k is not None
        if extra_k is None:
            ctx.save_for_backward(q, k0, v0, out, lse)
            return out
        kv_heads, acc = k0.shape[1], extra_k.dtype
        qp = _by_position(q, kv_heads).to(acc)
        scores = qp @ extra_k.transpose(-1, -2) * scale  # [B, T, kv, g, k]
        causal_lse = _by_position(lse, kv_heads).to(acc)  # [B, T, kv, g]
        merged_lse = torch.logaddexp(causal_lse, torch.logsumexp(scores, dim=-1))
        probs = torch.exp(scores - merged_lse[..., None])
        merged = _by_position(out, kv_heads).to(acc) * torch.exp(causal_lse - merged_lse)[..., None]
        merged = torch.baddbmm(merged.flatten(0, 2), probs.flatten(0, 2), extra_v.flatten(0, 2)).view(merged.shape)
        out, lse = _by_head(merged, q.dtype), _by_head(merged_lse, lse.dtype)
        ctx.save_for_backward(q, k0, v0, out, lse, qp, merged, merged_lse, extra_k, extra_v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k0, v0, out, lse, *extra = ctx.saved_tensors
        # Given the merged output and log-sum-exp, the kernel's P = exp(QK^T*s - lse) and
        # D = rowsum(dO * O) are those of the merged softmax restricted to the causal keys.
        grad_q, grad_k0, grad_v0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k0, v0, out, lse, 0.0, True, scale=ctx.scale)
        if not ctx.has_extra:
            return grad_q, grad_k0, grad_v0, None, None
        qp, merged, merged_lse, extra_k, extra_v = extra
        dout = _by_position(grad_out, k0.shape[1]).to(extra_k.dtype)
        delta = torch.linalg.vecdot(dout, merged)  # [B, T, kv, g]
        probs = torch.exp(qp @ extra_k.transpose(-1, -2) * ctx.scale - merged_lse[..., None])
        dscores = probs * (dout @ extra_v.transpose(-1, -2) - delta[..., None]) * ctx.scale  # [B, T, kv, g, k]
        grad_q = grad_q + _by_head(dscores @ extra_k, q.dtype)
        grad_extra_k = dscores.transpose(-1, -2) @ qp  # [B, T, kv, k, d]
        grad_extra_v = probs.transpose(-1, -2) @ dout
        return grad_q, grad_k0, grad_v0, grad_extra_k, grad_extra_v


def _by_position(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, T, ...] -> [B, T, kv_heads, group, ...] (query heads by the KV head they share)."""
    x = x.transpose(1, 2)
    return x.reshape(x.shape[0], x.shape[1], kv_heads, x.shape[2] // kv_heads, *x.shape[3:])


def _by_head(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``_by_position``: [B, T, kv, g, ...] -> [B, heads, T, ...]."""
    return x.to(dtype).flatten(2, 3).transpose(1, 2)


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

    return torch.compile(flex_attention)  # sequence lengths vary: recompiles once, then dynamic


def _flex_attention(q, keys, values):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _flex_block_mask(q.shape[2], len(keys), str(q.device))
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), block_mask=block_mask,
                  enable_gqa=q.shape[1] != keys[0].shape[1])
