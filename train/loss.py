"""The draft's LM head as a loss: soft cross-entropy against the target's distribution, in chunks.

Memory: logits never exist for all positions at once. ``_ChunkedSoftCE`` walks
``loss_chunk_tokens`` positions at a time; for each chunk it builds the teacher's
probabilities once (shared by all K steps, shifted by k), then each step's draft
logits, and computes the gradient w.r.t. the hidden states (and a trainable LM head)
right there, in the forward pass: the loss is the last node of the graph, so its
backward only scales the stored gradients. Nothing of size T x V is kept, and no
logits are recomputed.

The weighting of positions and steps (the normalization) is given by train/ttt.py's ``step_weights``.

``lk_loss`` replaces the per-position soft cross-entropy by one of the LK losses of Samarin et al.,
"LK Losses: Direct Acceptance Rate Optimization for Speculative Decoding" (arXiv 2602.23881), with
the acceptance alpha = sum_v min(p_v, q_v) of the target's p and the draft's q (1 - total variation):

- ``alpha``: -log(alpha), alpha floored at 1e-5 (below it no gradient), as speculators' ``nla`` loss and
  SpecForge's ``lk_loss_type=alpha`` (both average it over the loss-masked positions, as here);
- ``lambda``: w * KL(p || q) + (1 - w) * (1 - alpha) with w = exp(-eta * alpha), alpha not differentiated
  in w, per position: speculators' ``lk_hybrid`` (eta 3). SpecForge's ``lk_loss_type=lambda`` (the
  paper's authors' pull request) forms w once per TTT step from the step's mean alpha over the batch and
  blends the step means; per position is chosen here because it needs nothing outside a chunk.

With a reduced vocabulary alpha uses the target's own probabilities of the draft's tokens (not
renormalized: tokens outside the draft's vocab can never be accepted), KL the renormalized ones, as
SpecForge does. The logged ``ce_k`` stays the soft cross-entropy whatever the loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

LK_ALPHA_FLOOR = 1e-5  # -log(alpha) is taken of max(alpha, this), as speculators' nla loss


class LMHeadLoss(nn.Module):
    """The draft's LM head as a loss: the target's frozen head (full vocab) or a trainable reduced one.

    It is a module so that, under ZeRO-3, a trainable ``lm_head.weight`` is gathered
    for its forward like any other parameter.
    """

    def __init__(self, arch, target, d2t: Optional[torch.Tensor]):
        super().__init__()
        self.target = [target]  # a list: not a submodule (the draft owns it)
        if arch.reduced_vocab:
            if d2t is None or d2t.shape != (arch.draft_vocab_size,):
                raise ValueError(f"a reduced vocab of {arch.draft_vocab_size} needs d2t of that length")
            draft_ids = torch.arange(arch.draft_vocab_size) + d2t
            t2d = torch.zeros(arch.vocab_size, dtype=torch.bool)
            t2d[draft_ids] = True
            self.weight = nn.Parameter(torch.empty(arch.draft_vocab_size, arch.hidden_size))
            self.register_buffer("d2t", d2t.to(torch.int64), persistent=False)
            self.register_buffer("t2d", t2d, persistent=False)
            self.register_buffer("draft_ids", draft_ids, persistent=False)
        else:
            self.weight = None
            self.d2t = self.t2d = self.draft_ids = None

    @torch.no_grad()
    def init_from_target(self) -> None:
        if self.weight is not None:
            self.weight.copy_(self.target[0].lm_head_weight[self.draft_ids].float())

    def forward(self, hidden, teacher, masks, weights, chunk_tokens: int, lk_loss: Optional[str] = None,
                lk_eta: float = 3.0):
        target_weight = self.target[0].lm_head_weight
        draft_weight = target_weight if self.weight is None else self.weight
        return _ChunkedSoftCE.apply(hidden, draft_weight, teacher, target_weight, masks, weights,
                                    self.draft_ids, self.t2d, chunk_tokens, lk_loss, lk_eta)


def _softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place (no [rows, V] temporaries): logits -> probabilities; also (argmax, log-sum-exp)."""
    top, argmax = logits.max(dim=-1)
    total = logits.sub_(top[:, None]).exp_().sum(-1)
    logits.div_(total[:, None])
    return logits, argmax, top + total.log()


class _ChunkedSoftCE(torch.autograd.Function):
    """Weighted soft cross-entropy of K steps' draft logits against the shifted teacher, by chunks."""

    @staticmethod
    def forward(ctx, hidden, draft_weight, teacher, target_weight, masks, weights, draft_ids, t2d, chunk_tokens,
                lk_loss=None, lk_eta=3.0):
        if lk_loss not in (None, "alpha", "lambda"):
            raise ValueError(f"unknown lk_loss {lk_loss!r}")
        steps, batch, length, _ = hidden.shape
        acc = torch.promote_types(hidden.dtype, torch.float32)  # logits, softmax and sums: fp32 at least
        want_weight_grad = ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros(draft_weight.shape, dtype=acc, device=hidden.device) \
            if want_weight_grad else None
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # per step: CE sum, correct, positions, then (step k >= 1) positions where the draft's argmax equals step
        # k - 1's at the same position (slots collapsing into one prediction) and where the teacher's does
        # (the data repeating itself: what collapse should be compared with)
        stats = torch.zeros(steps, 5, dtype=torch.float64, device=hidden.device)
        stats[:, 2] = masks.sum(dim=(1, 2)).double()
        agree = torch.zeros_like(masks)  # [K, B, T]: step k's argmax is the teacher's (mask or not)
        span = max(1, chunk_tokens // batch)
        for start in range(0, length, span):
            stop = min(start + span, length)
            # teacher rows for this chunk's K steps: positions start .. stop + K - 2
            rows = teacher[:, start:min(stop + steps - 1, length)]
            num_rows = rows.shape[1]
            target_logits = (rows.flatten(0, 1) @ target_weight.T).to(acc)
            in_vocab = mass = entropy = None
            if draft_ids is None:
                probs, target_argmax, _ = _softmax_(target_logits)
            else:  # reduced vocab: teacher renormalised over the draft's tokens
                target_argmax = target_logits.argmax(-1)
                in_vocab = t2d[target_argmax].view(batch, num_rows)
                if lk_loss is not None:  # the target's probability of the draft's vocab, for alpha
                    full_lse = target_logits.logsumexp(-1)
                probs, _, draft_lse = _softmax_(target_logits[:, draft_ids])
                if lk_loss is not None:
                    mass = (draft_lse - full_lse).exp().view(batch, num_rows)
            if lk_loss == "lambda":  # H(p), for KL = CE - H(p)
                entropy = -torch.special.xlogy(probs, probs).sum(-1).view(batch, num_rows)
            probs, target_argmax = probs.view(batch, num_rows, -1), target_argmax.view(batch, num_rows)
            previous = None  # step k - 1's draft argmax over this chunk, [batch, its positions]
            for k in range(steps):
                end = min(stop, length - k)  # step k has no teacher (and no mask) past length - k
                if end <= start:
                    continue
                n = end - start
                h = hidden[k, :, start:end].flatten(0, 1)
                p = probs[:, k:k + n].flatten(0, 1)
                m = counted = masks[k, :, start:end].flatten()  # counted: every masked position, as stats[:, 2]
                w = weights[k, :, start:end].flatten().to(acc)
                if in_vocab is not None:
                    valid = in_vocab[:, k:k + n].flatten()
                    m, w = m & valid, w * valid
                logits = (h @ draft_weight.T).to(acc)
                dot = torch.linalg.vecdot(p, logits)
                q, draft_argmax, lse = _softmax_(logits)
                ce = lse - dot  # = -sum_v p * log q
                if draft_ids is not None:
                    draft_argmax = draft_ids[draft_argmax]
                if lk_loss is None:
                    loss += (ce * w).sum().double()
                stats[k, 0] += (ce * m).sum().double()
                match = draft_argmax == target_argmax[:, k:k + n].flatten()
                agree[k, :, start:end] = match.view(batch, n)
                stats[k, 1] += (match & m).sum().double()
                if previous is not None:
                    same = draft_argmax.view(batch, n) == previous[:, :n]
                    repeat = target_argmax[:, k:k + n] == target_argmax[:, k - 1:k - 1 + n]
                    stats[k, 3] += (same.flatten() & counted).sum().double()
                    stats[k, 4] += (repeat.flatten() & counted).sum().double()
                previous = draft_argmax.view(batch, n)
                if lk_loss is None:
                    grad_logits = q.sub_(p).mul_(w[:, None])  # d loss / d logits = w * (softmax - teacher)
                else:
                    accepted = p if mass is None else p * mass[:, k:k + n].flatten()[:, None]
                    grad_logits = _lk_grad_logits_(q, p, accepted, w, lk_loss, lk_eta, loss, ce,
                                                   None if entropy is None else entropy[:, k:k + n].flatten())
                grad_hidden[k, :, start:end] = (grad_logits.to(draft_weight.dtype) @ draft_weight).view(batch, n, -1)
                if want_weight_grad:
                    grad_weight.addmm_(grad_logits.T, h.to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = draft_weight.dtype
        ctx.mark_non_differentiable(stats, agree)
        return loss.to(acc), stats, agree

    @staticmethod
    def backward(ctx, grad_loss, grad_stats, grad_agree):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _lk_grad_logits_(q, p, accepted, w, lk_loss, eta, loss, ce, entropy):
    """The LK loss of [n] positions (module docstring) added to ``loss`` (weighted by ``w``); returns its
    gradient w.r.t. the draft logits (``q``, the draft's probabilities, may be overwritten).

    d alpha / d z_j = q_j (s_j - sum_v s_v q_v), s_v = [q_v < accepted_v]: alpha = sum_v min(q_v, accepted_v)
    follows q where q is the smaller."""
    below = (q < accepted).to(q.dtype)
    alpha = torch.minimum(q, accepted).sum(-1)
    below.mul_(q)  # s * q
    dalpha = below.sub_(q * below.sum(-1, keepdim=True))  # d alpha / d logits, [n, V]
    if lk_loss == "alpha":
        kept = alpha > LK_ALPHA_FLOOR
        loss += (-alpha.clamp_min(LK_ALPHA_FLOOR).log() * w).sum().double()
        return dalpha.mul_(torch.where(kept, -w / alpha.clamp_min(LK_ALPHA_FLOOR), 0.0)[:, None])
    kl_weight = torch.exp(-eta * alpha)  # not differentiated
    loss += ((kl_weight * (ce - entropy) + (1 - kl_weight) * (1 - alpha)) * w).sum().double()
    # d/dz: kl_weight * (q - p) + (1 - kl_weight) * (-d alpha / dz), times w
    grad = q.sub_(p).mul_((kl_weight * w)[:, None])
    return grad.sub_(dalpha.mul_(((1 - kl_weight) * w)[:, None]))

