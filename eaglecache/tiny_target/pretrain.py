"""Pretraining the tiny target on CPU and measuring it against a unigram baseline.

Conversations are rendered through the tokenizer's chat template (the same text the data stage
produces), packed into ``seq_len`` windows separated by ``<|endoftext|>``, and trained with AdamW,
linear warmup then cosine decay, in float32 on every machine: bf16 would be about as fast only on CPUs
with native bf16 and 50x slower on the rest (AVX2-only), and one dtype everywhere makes the built
model the same on every machine up to floating-point rounding. The report compares held-out
next-token loss with the held-out cross-entropy of the training tokens' unigram distribution
(add-one smoothed).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eaglecache.tiny_target.spec import TinyTargetSpec

RENDER_BATCH = 64  # conversations tokenized per call
MAX_CONVERSATION_TOKENS = 1024  # a cap so a few very long chats do not fill the whole budget


def pack_conversations(tokenizer, conversations: Iterable[tuple[int, str, list[dict]]], num_sequences: int,
                       seq_len: int, separator_id: int) -> tuple[torch.Tensor, list[int]]:
    """Render and tokenize conversations until ``num_sequences`` windows of ``seq_len`` are full.

    Returns the windows ``[num_sequences, seq_len]`` and the record indices of the conversations used.
    """
    needed = num_sequences * seq_len
    stream: list[int] = []
    used: list[int] = []
    pending: list[tuple[int, str, list[dict]]] = []

    def flush() -> None:
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for _, _, m in pending]
        # The Rust tokenizer directly: same ids, no per-call overhead or over-length warnings.
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for (record_index, _, _), ids in zip(pending, (e.ids for e in encodings)):
            if len(stream) >= needed:
                break
            stream.extend(ids[:MAX_CONVERSATION_TOKENS])
            stream.append(separator_id)
            used.append(record_index)
        pending.clear()

    for item in conversations:
        pending.append(item)
        if len(pending) == RENDER_BATCH:
            flush()
            if len(stream) >= needed:
                break
    if pending and len(stream) < needed:
        flush()
    if len(stream) < needed:
        raise RuntimeError(f"corpus too small: {len(stream)} tokens for {needed}")
    return torch.tensor(stream[:needed], dtype=torch.long).view(num_sequences, seq_len), used


def lr_at(step: int, spec: TinyTargetSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr_min + 0.5 * (spec.lr - spec.lr_min) * (1 + math.cos(math.pi * progress))


def pretrain(model, sequences: torch.Tensor, spec: TinyTargetSpec, progress: bool = True) -> list[float]:
    """Train ``model`` in place for ``spec.steps`` steps over ``sequences``; returns per-step losses."""
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(spec.seed))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    losses = []
    bar = tqdm(range(spec.steps), desc="pretraining tiny target", unit="step", disable=not progress)
    for step in bar:
        rows = order[[(step * spec.batch_size + i) % len(order) for i in range(spec.batch_size)]]
        batch = sequences[rows]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def next_token_loss(model, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over every position of ``sequences``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def unigram_baseline(train_sequences: torch.Tensor, heldout_sequences: torch.Tensor,
                     vocab_size: int) -> tuple[float, float]:
    """(entropy of the training unigram distribution, its cross-entropy on held-out targets), nats.

    Counts are add-one smoothed so a held-out token unseen in training has finite loss.
    """
    counts = torch.bincount(train_sequences[:, 1:].reshape(-1), minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    entropy = -(log_probs.exp() * log_probs).sum().item()
    heldout_ce = -log_probs[heldout_sequences[:, 1:].reshape(-1)].mean().item()
    return entropy, heldout_ce
