"""The draft's LM head as a loss: soft cross-entropy against the target's distribution, in chunks.

Memory: logits never exist for all positions at once. ``_ChunkedSoftCE`` walks
``loss_chunk_tokens`` positions at a time; for each chunk it builds the teacher's
probabilities once (shared by all K steps, shifted by k), then each step's draft
logits, and computes the gradient w.r.t. the hidden states (and a trainable LM head)
right there, in the forward pass: the loss is the last node of the graph, so its
backward only scales the stored gradients. Nothing of size T x V is kept, and no
logits are recomputed.

The weighting of positions and steps (the normalization) is given by train/ttt.py's ``step_weights``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


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

    def forward(self, hidden, teacher, masks, weights, chunk_tokens: int):
        target_weight = self.target[0].lm_head_weight
        draft_weight = target_weight if self.weight is None else self.weight
        return _ChunkedSoftCE.apply(hidden, draft_weight, teacher, target_weight, masks, weights,
                                    self.draft_ids, self.t2d, chunk_tokens)


def _softmax_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place (no [rows, V] temporaries): logits -> probabilities; also (argmax, log-sum-exp)."""
    top, argmax = logits.max(dim=-1)
    total = logits.sub_(top[:, None]).exp_().sum(-1)
    logits.div_(total[:, None])
    return logits, argmax, top + total.log()


class _ChunkedSoftCE(torch.autograd.Function):
    """Weighted soft cross-entropy of K steps' draft logits against the shifted teacher, by chunks."""

    @staticmethod
    def forward(ctx, hidden, draft_weight, teacher, target_weight, masks, weights, draft_ids, t2d, chunk_tokens):
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
            in_vocab = None
            if draft_ids is None:
                probs, target_argmax, _ = _softmax_(target_logits)
            else:  # reduced vocab: teacher renormalised over the draft's tokens
                target_argmax = target_logits.argmax(-1)
                in_vocab = t2d[target_argmax].view(batch, num_rows)
                probs = _softmax_(target_logits[:, draft_ids])[0]
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
                grad_logits = q.sub_(p).mul_(w[:, None])  # d loss / d logits = w * (softmax - teacher)
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
        return grad_hidden, grad_weight, None, None, None, None, None, None, None

