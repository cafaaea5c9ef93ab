"""The EAGLE-family draft: a Llama decoder layer on [embedding, fc(aux states)], then any further plain
Llama layers (``train.draft.num_layers``), in vLLM's tensor names.

Parameter names are exactly those vLLM's ``LlamaForCausalLMEagle3`` loads, as the
draft format lists them (eaglecache/formats/draft.py ``tensor_shapes``; the module
checks it at construction). The layer mirrors vLLM's forward: q/k/v
read 2*H inputs ``[input_layernorm(embed), hidden_norm(h)]``, the residual is
``h`` itself, and the layer's pre-norm output is both what the next TTT step
carries and, after ``norm``, what the LM head reads. RoPE comes from the
target's config through transformers' own rotary code, so every RoPE variant the
target uses is reproduced.

The frozen target embedding / final norm / LM head live in ``target`` as
buffers (train/target_head.py). ``forward`` is the TTT training loss (train/ttt.py) with
the settings the draft was built with; the LM head and its loss are train/loss.py's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from eaglecache.formats.draft import LM_HEAD, DraftArch, initial_tensors, tensor_shapes
from eaglecache.train.attention import KeyCache, ttt_attention
from eaglecache.train.loss import LMHeadLoss
from eaglecache.train.target_head import TargetHead, rms_norm
from eaglecache.train.ttt import TTTSettings, ttt_loss

class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """cos/sin tables of the target's RoPE, computed by transformers' LlamaRotaryEmbedding."""

    def __init__(self, arch: DraftArch):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
                             head_dim=arch.head_dim, max_position_embeddings=arch.max_position_embeddings,
                             **arch.rope)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(length, device=like.device)[None]
        cos, sin = self.rotary(like, positions)
        return cos[0], sin[0]  # [length, head_dim]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, d]; cos/sin [T, d]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


class SplitInputLinear(nn.Linear):
    """A q/k/v projection over ``[norm(embed), norm(h)]`` (2*H inputs) that can apply either half alone.

    The embedding half of step k at position t is that of step 0 at position t + k (the
    ids are shifted by one per step), so it is computed once for all steps; each step
    then only projects its hidden half. Same weight, same sum, no ``cat``.
    """

    def forward(self, x: torch.Tensor, half: str) -> torch.Tensor:
        width = self.in_features // 2
        weight = self.weight[:, :width] if half == "embed" else self.weight[:, width:]
        return F.linear(x, weight)


class Attention(nn.Module):
    """The midlayer's attention: q/k/v read ``[norm(embed), norm(h)]`` (2*H, ``SplitInputLinear``)."""

    in_factor, projection = 2, SplitInputLinear

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim)
        in_features = self.in_factor * arch.hidden_size
        self.q_proj = self.projection(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = self.projection(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = self.projection(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, arch.hidden_size, bias=False)

    def project_embeds(self, embeds_normed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The embedding half of q, k, v for every position (all TTT steps slice it)."""
        return tuple(proj(embeds_normed, "embed") for proj in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, embed_qkv, hidden_normed, cos, sin, cache: KeyCache, implementation: str):
        """Returns (output [B, T, H], the cache with this step's key and value added)."""
        q = embed_qkv[0] + self.q_proj(hidden_normed, "hidden")
        k = embed_qkv[1] + self.k_proj(hidden_normed, "hidden")
        v = embed_qkv[2] + self.v_proj(hidden_normed, "hidden")
        return self.attend(q, k, v, cos, sin, cache, implementation)

    def attend(self, q, k, v, cos, sin, cache: KeyCache, implementation: str):
        """Projected q/k/v [B, T, heads * d] -> (output [B, T, H], the cache with k and v added)."""
        batch, length, _ = q.shape
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        q = apply_rotary(q, cos, sin).transpose(1, 2)
        k = apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        cache = cache.append(k, v, implementation)
        out = ttt_attention(q, cache, implementation)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), cache


class LayerAttention(Attention):
    """The attention of a decoder layer after the first: q/k/v read the layer's normed input alone (H)."""

    in_factor, projection = 1, nn.Linear

    def forward(self, x_normed, cos, sin, cache: KeyCache, implementation: str):
        return self.attend(self.q_proj(x_normed), self.k_proj(x_normed), self.v_proj(x_normed), cos, sin, cache,
                           implementation)


class MLP(nn.Module):
    def __init__(self, arch: DraftArch):
        super().__init__()
        if arch.hidden_act != "silu":
            raise ValueError(f"draft MLP supports hidden_act 'silu', not {arch.hidden_act!r}")
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """vLLM's EAGLE3 decoder layer (norm after residual): returns the pre-norm output h'.

    ``embed_projections`` computes the embedding half of q/k/v for all positions once
    per batch; ``forward`` is one TTT step on a slice of it.
    """

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.hidden_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def embed_projections(self, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.self_attn.project_embeds(self.input_layernorm(embeds))

    def forward(self, embed_qkv, hidden, cos, sin, cache: KeyCache, implementation: str):
        """One TTT step: (new pre-norm hidden state, the key cache with this step's keys added)."""
        attn, cache = self.self_attn(embed_qkv, self.hidden_norm(hidden), cos, sin, cache, implementation)
        residual = hidden + attn
        return residual + self.mlp(self.post_attention_layernorm(residual)), cache


class DecoderLayer(nn.Module):
    """A decoder layer after the first (``layers.{i}``, i >= 1): a plain pre-norm Llama layer over the previous
    layer's pre-norm output, with its own key cache across TTT steps (vLLM's fused add-norm chain computes
    the same sums)."""

    def __init__(self, arch: DraftArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LayerAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, cache: KeyCache, implementation: str):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, implementation)
        residual = x + attn
        return residual + self.mlp(self.post_attention_layernorm(residual)), cache


def check_format_names(draft: nn.Module) -> None:
    """A draft's parameters are the draft format's tensors, by name and shape: export writes them and
    vLLM loads them under these names."""
    shapes = {name: tuple(p.shape) for name, p in draft.named_parameters()}
    if shapes != tensor_shapes(draft.arch):
        raise AssertionError(f"draft parameters {shapes} differ from the draft format's tensors")


@torch.no_grad()
def init_from_format(draft: nn.Module, seed: int) -> None:
    """The draft format's initial tensors (HF Llama init), except that the output norm starts as the
    target's final norm and a reduced LM head as the target's rows: the LM head reads the draft's
    normed state as if it were the target's."""
    initial = initial_tensors(draft.arch, seed)
    for name, param in draft.named_parameters():
        if name != LM_HEAD:
            param.copy_(initial[name])
    draft.norm.weight.copy_(draft.target.norm_weight.float())
    draft.lm_head.init_from_target()


class Eagle3Draft(nn.Module):
    """The trainable draft plus the frozen target head; ``forward`` returns the TTT loss and stats."""

    def __init__(self, arch: DraftArch, target: TargetHead, settings: TTTSettings,
                 d2t: Optional[torch.Tensor] = None):
        super().__init__()
        self.arch = arch
        self.settings = settings
        eps = arch.rms_norm_eps
        if arch.aux_norm == "joint":  # EAGLE 3.1: vLLM's norm_before_fc
            self.input_norm = RMSNorm(arch.aux_width, eps)
        elif arch.aux_norm == "per_layer":  # EAGLE 3.1: vLLM's fc_norm
            self.fc_norm = nn.ModuleList(RMSNorm(arch.target_hidden_size, eps) for _ in arch.aux_layer_ids)
        self.fc = nn.Linear(arch.aux_width, arch.hidden_size, bias=False)
        if arch.parallel:  # P-EAGLE: the state of the parallel slots, in pre-fc aux space
            self.mask_hidden = nn.Parameter(torch.zeros(1, arch.aux_width))
        self.midlayer = MidLayer(arch)
        # keyed "1".. so the parameter names are vLLM's layers.{i}.*; empty (no parameters) for one layer
        self.layers = nn.ModuleDict({str(i): DecoderLayer(arch) for i in range(1, arch.num_layers)})
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = Rotary(arch)
        self.target = target
        self.lm_head = LMHeadLoss(arch, target, d2t)
        check_format_names(self)

    def init_weights(self, seed: int) -> None:
        init_from_format(self, seed)

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The layer's input state from aux states [..., A*H_t]: vLLM's ``combine_hidden_states``."""
        aux = aux.to(self.fc.weight.dtype)
        if self.arch.aux_norm == "joint":
            aux = self.input_norm(aux)
        elif self.arch.aux_norm == "per_layer":
            chunks = aux.chunk(len(self.fc_norm), dim=-1)
            aux = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux)

    def step(self, embed_qkv, hidden, cos, sin, caches: tuple[KeyCache, ...], implementation: str):
        """One TTT step through every layer: (the last layer's pre-norm output, each layer's key cache)."""
        hidden, cache = self.midlayer(embed_qkv, hidden, cos, sin, caches[0], implementation)
        new_caches = [cache]
        for i, layer in enumerate(self.layers.values(), start=1):
            hidden, cache = layer(hidden, cos, sin, caches[i], implementation)
            new_caches.append(cache)
        return hidden, tuple(new_caches)

    def forward(self, input_ids, loss_mask, aux, final):
        """Shifted batch (train/loader.py) -> (loss, stats [ttt_length, 5]) of train/ttt.py's ttt_loss."""
        return ttt_loss(self, input_ids, loss_mask, aux, final, self.settings)
