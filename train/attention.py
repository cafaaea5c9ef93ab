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

    GQA without copies: the flash kernel takes fewer KV heads itself, and the diagonal
    terms view the query heads as [kv_heads, group] and broadcast each KV head over its group.
    """

    @staticmethod
    def forward(ctx, q, num_steps, *kv):
        keys, values = kv[:num_steps], kv[num_steps:]
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys[0], values[0], 0.0, True, scale=scale)
        extra_k, extra_v = keys[1:], values[1:]
        if extra_k:
            acc = _accumulation_dtype(q)  # fp32 (or wider), like the kernel's log-sum-exp
            qg = _grouped(q, keys[0].shape[1]).to(acc)
            scores = [_diagonal_scores(qg, k.to(acc), scale) for k in extra_k]
            lse = _grouped(lse[..., None], keys[0].shape[1])[..., 0].to(acc)
            merged_lse = torch.logsumexp(torch.stack([lse, *scores]), dim=0)
            merged = _grouped(out, keys[0].shape[1]).to(acc) * torch.exp(lse - merged_lse)[..., None]
            for score, v in zip(scores, extra_v):
                merged += torch.exp(score - merged_lse)[..., None] * v.to(acc)[:, :, None]
            out, lse = merged.flatten(1, 2).to(q.dtype), merged_lse.flatten(1, 2)
        ctx.save_for_backward(q, out, lse, *keys, *values)
        ctx.num_steps, ctx.scale = num_steps, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        keys, values = kv[:ctx.num_steps], kv[ctx.num_steps:]
        kv_heads = keys[0].shape[1]
        grad_out = grad_out.contiguous()
        # Given the merged output and log-sum-exp, the kernel's P = exp(QK^T*s - lse) and
        # D = rowsum(dO * O) are those of the merged softmax restricted to the causal keys.
        grad_q, grad_k0, grad_v0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, keys[0], values[0], out, lse, 0.0, True, scale=ctx.scale)
        grad_keys, grad_values = [grad_k0], [grad_v0]
        if ctx.num_steps > 1:
            acc = _accumulation_dtype(q)
            dout, qg = _grouped(grad_out, kv_heads).to(acc), _grouped(q, kv_heads).to(acc)
            lse_g = _grouped(lse[..., None], kv_heads)[..., 0]
            delta = (dout * _grouped(out, kv_heads).to(acc)).sum(-1)
            grad_qg = _grouped(grad_q, kv_heads).to(acc)
            for k, v in zip(keys[1:], values[1:]):
                kf, vf = k.to(acc)[:, :, None], v.to(acc)[:, :, None]
                prob = torch.exp(_diagonal_scores(qg, k.to(acc), ctx.scale) - lse_g)
                dscore = prob * ((dout * vf).sum(-1) - delta) * ctx.scale
                grad_qg += dscore[..., None] * kf
                grad_keys.append((dscore[..., None] * qg).sum(2).to(k.dtype))
                grad_values.append((prob[..., None] * dout).sum(2).to(v.dtype))
            grad_q = grad_qg.flatten(1, 2).to(q.dtype)
        return (grad_q, None, *grad_keys, *grad_values)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, heads, T, d] -> [B, kv_heads, group, T, d] (a view): query heads by the KV head they share."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _diagonal_scores(q_grouped: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """q . k at the same position: [B, kv, g, T, d] x [B, kv, T, d] -> [B, kv, g, T]."""
    return (q_grouped * key[:, :, None]).sum(-1) * scale


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
