"""The TTT unroll: draft steps 0..K-1 over a batch, and the normalization of their loss.

The algorithm, as the public EAGLE3 trainers agree on it. The batch arrives shifted (train/loader.py):
``input_ids[t]`` is the token after position t, ``final[t]`` the target's pre-norm
state one position later, ``loss_mask`` unshifted with its last position zeroed.

- ``h = fc(aux)`` once (EAGLE 3.1 normalizes the aux states first). Step k feeds the token
  ``input_ids[t + k]`` and the carried ``h`` (pre-norm, not detached) to the layer at RoPE positions ``t + k``; its
  attention sees the step-0 keys 0..t and the keys of steps 1..k at t. (The token's
  half of q/k/v is therefore step 0's at t + k: it is projected once for all steps.)
- EAGLE 3.1 carries ``norm(h)`` instead of ``h``; P-EAGLE feeds its steps 1.. the mask token and
  ``fc(mask_hidden)`` instead (``unroll``).
- Step k's logits are ``lm_head(norm(h_k))``; its teacher is the target's softmax
  at ``final[t + k]``; its mask is ``loss_mask[t + k]`` (zero past the end). In raw (unshifted) positions
  step k at t predicts token t + k + 2 and is weighted by the mask of token t + k, as EAGLE3's reference
  and SpecForge do; ``train.loss_mask_alignment: predicted`` weights it by ``loss_mask[t + k + 2]``, the
  mask of the token it predicts (``step_weights``; docs/loss.md).
- ``train.hidden_noise`` x > 0: in training only, the aux states get uniform noise U(-x, x) before fc
  (``noisy_aux``), as speculators' ``--noise-std``.

THE LOSS NORMALIZATION (the one used everywhere): each step's soft cross-entropy
is averaged over that step's loss-masked positions in the micro-batch, and the
steps are summed with weights ttt_decay**k::

    loss = sum_k ttt_decay**k * sum_{b,t} mask_k[b,t] * CE_k[b,t] / max(1, sum_{b,t} mask_k[b,t])

With a reduced vocabulary, positions whose target argmax is outside it contribute
zero but still count in the denominator (and count as wrong in the accuracy).
``train.lk_loss`` replaces CE_k by an LK loss, same weights (train/loss.py).

The loss itself (the LM head and its chunked soft cross-entropy) is train/loss.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from eaglecache.train.attention import KeyCache
from eaglecache.train.metrics import decode_walk


@dataclass
class TTTSettings:
    """What the unroll needs of train.*: the draft is built with them (train/draft.py)."""

    ttt_length: int = 7
    ttt_decay: float = 0.8
    loss_chunk_tokens: int = 2048
    attention: str = "reference"  # a resolved implementation (train/attention.py)
    gradient_checkpointing: bool = False
    lk_loss: Optional[str] = None  # None, "alpha" or "lambda" (train/loss.py)
    lk_eta: float = 3.0
    hidden_noise: float = 0.0  # half-width of the uniform noise on the aux states, training only
    loss_mask_alignment: str = "anchor"  # or "predicted" (step_weights)

    @classmethod
    def from_config(cls, train, device: torch.device) -> "TTTSettings":
        """From the train section, with its attention kernel resolved for ``device``."""
        from eaglecache.train.attention import resolve_implementation

        return cls(ttt_length=train.ttt_length, ttt_decay=train.ttt_decay, loss_chunk_tokens=train.loss_chunk_tokens,
                   attention=resolve_implementation(train.attention, device),
                   gradient_checkpointing=train.gradient_checkpointing, lk_loss=train.lk_loss,
                   lk_eta=train.lk_eta, hidden_noise=train.hidden_noise,
                   loss_mask_alignment=train.loss_mask_alignment)


def shift_left(x: torch.Tensor, k: int) -> torch.Tensor:
    """x[:, t] <- x[:, t + k] along dim 1, zeros past the end."""
    if k == 0:
        return x
    out = torch.zeros_like(x)
    out[:, :-k] = x[:, k:]
    return out


# how many positions past step k's own (t + k) its mask is read: the anchor's, or the predicted token's
MASK_OFFSET = {"anchor": 0, "predicted": 2}


def step_weights(loss_mask: torch.Tensor, ttt_length: int, ttt_decay: float,
                 alignment: str = "anchor") -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [K, B, T] bool, weights [K, B, T] fp64): the normalization of the module docstring.

    ``alignment``: step k at t is weighted by ``loss_mask[t + k]`` (anchor) or ``loss_mask[t + k + 2]``
    (predicted: the mask of the token it predicts; the loader zeroes the last position, so a sample's last
    token is never a predicted one)."""
    offset = MASK_OFFSET[alignment]
    masks = torch.stack([shift_left(loss_mask.bool(), k + offset) for k in range(ttt_length)])
    counts = masks.sum(dim=(1, 2)).clamp_min(1).double()
    decay = torch.tensor([ttt_decay ** k for k in range(ttt_length)], dtype=torch.float64, device=masks.device)
    return masks, masks.double() * (decay / counts)[:, None, None]


def unroll(draft, input_ids: torch.Tensor, aux: torch.Tensor, settings: TTTSettings) -> list[torch.Tensor]:
    """Steps 0..K-1 of the draft over a shifted batch: the post-norm state of each step, [B, T, H] each
    (what the LM head reads; vLLM's drafter computes the same, serve/draft_probe.py records it).

    The family decides what steps 1.. read: EAGLE3 carries the pre-norm state, EAGLE 3.1 the post-norm
    one (``norm_output``); P-EAGLE carries nothing: its steps 1.. read the mask token and
    ``combine(mask_hidden)``, as vLLM's parallel slots do, so they see step 0 only through attention."""
    batch, length = input_ids.shape
    steps = settings.ttt_length
    arch = draft.arch
    hidden = draft.combine(aux.flatten(2))
    cos, sin = draft.rotary(length + steps - 1, hidden)
    # step k reads the token at t + k: embed the ids once, extended by K - 1 padding (zero) tokens
    ids = torch.nn.functional.pad(input_ids, (0, steps - 1))
    embed_qkv = draft.midlayer.embed_projections(draft.target.embed(ids))
    if arch.parallel:  # one token and one state for every slot: [1, 1, .] broadcasts over the batch
        mask_ids = torch.full((1, 1), arch.mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
        mask_qkv = draft.midlayer.embed_projections(draft.target.embed(mask_ids))
        mask_state = draft.combine(draft.mask_hidden)[None].expand(batch, length, -1)
    caches, normed = (KeyCache(),) * arch.num_layers, []
    for k in range(steps):
        if arch.parallel and k > 0:
            step_qkv, step_hidden = mask_qkv, mask_state
        else:
            step_qkv, step_hidden = tuple(x[:, k:k + length] for x in embed_qkv), hidden
        args = (step_qkv, step_hidden, cos[k:k + length], sin[k:k + length], caches, settings.attention)
        if settings.gradient_checkpointing and torch.is_grad_enabled():
            hidden, caches = checkpoint(draft.step, *args, use_reentrant=False)
        else:
            hidden, caches = draft.step(*args)
        normed.append(draft.norm(hidden))
        if arch.norm_output:
            hidden = normed[-1]
    return normed


def noisy_aux(aux: torch.Tensor, settings: TTTSettings, training: bool, dtype: torch.dtype) -> torch.Tensor:
    """The aux states, in training with uniform noise U(-x, x) added, x = ``settings.hidden_noise`` (fp32 at least).

    As speculators' ``--noise-std`` (its ``AddUniformNoise`` on the concatenated aux states of its training
    split, not on the verifier's last state, absolute): the teacher ``final`` is never perturbed. Drawn from
    torch's global generator, which checkpoints save and restore per rank, so a resumed run draws the same."""
    if not training or settings.hidden_noise <= 0:
        return aux
    # drawn and added in fp32 at least; combine() then rounds to the compute dtype: in bf16, noise below half a
    # step of an aux value vanishes there (on the tiny target, |aux| ~ 35: step 0.25), as it does in speculators
    aux = aux.to(torch.promote_types(dtype, torch.float32))
    return aux + (torch.rand_like(aux) * 2 - 1) * settings.hidden_noise


def ttt_loss(draft, input_ids, loss_mask, aux, final, settings: TTTSettings):
    """The TTT training loss of one micro-batch: (loss, stats [K, 7] fp64).

    Row k of stats: step k's CE sum, correct count, position count, positions where its argmax is step
    k-1's and where the teacher's is (train/loss.py), then the accepted tokens and drafting rounds of a
    greedy decode walk with k + 1 speculative tokens (train/metrics.py). The walk
    is P-EAGLE's acceptance rule exactly (its step k at t never reads a drafted token), and EAGLE3's
    with the true tokens in place of the drafted ones."""
    normed = unroll(draft, input_ids, noisy_aux(aux, settings, draft.training, draft.fc.weight.dtype), settings)
    masks, weights = step_weights(loss_mask, settings.ttt_length, settings.ttt_decay, settings.loss_mask_alignment)
    with torch.no_grad():
        teacher = draft.target.final_norm(final)
    loss, stats, agree = draft.lm_head(torch.stack(normed), teacher, masks, weights, settings.loss_chunk_tokens,
                                       settings.lk_loss, settings.lk_eta)
    return loss, torch.cat([stats, decode_walk(agree, loss_mask).to(stats.device)], dim=1)
