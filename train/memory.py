"""Training memory per GPU on paper: what one rank holds at its peak, from the config and the target's config.json.

This module owns the arithmetic of ``eaglecache plan``'s memory table (train/cli.py prints it) and nothing
else: no torch tensors, no DeepSpeed. Each figure is a product of sizes printed beside it, so it can be
checked by hand. What it counts, per rank, in bytes (e = bytes of the compute dtype, T tokens of a
micro-batch of B sequences, H hidden, q / kv the widths of the query / key-value heads, I the MLP width,
K the TTT depth, V the vocab, A the aux layers, P the draft's trainable parameters, N the ranks):

- the target's embedding and LM head: frozen buffers, whole on every rank (train/target_head.py);
- the draft's ZeRO-3 shards, P/N x 16 B: the dtype's parameter and gradient partitions, fp32 master
  weights (none in fp32: DeepSpeed reuses the partition), AdamW's two fp32 moments;
- the draft gathered whole, P x e: one layer reused by every TTT step stays gathered through backward;
- DeepSpeed's gradient reduce bucket (reduce_bucket_size elements of the dtype), allocated at start;
- the micro-batch as it arrives (int64 ids, uint8 mask, bf16 aux and final states);
- what the TTT unroll keeps through backward (per token, ``kept_bytes_per_token``);
- the larger of the two working sets on top: the chunked LM-head loss in forward, or backward's
  recompute of one TTT step (with gradient checkpointing) and its gradients.
The loader's read-ahead buffers are host memory (pinned on a GPU) and are given apart.

Modelled: the EAGLE families (eagle3, eagle3.1, peagle) with a full-vocab head shared with the target;
a reduced vocab's trainable head is counted in P but its loss temporaries as the full vocab's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from eaglecache.formats.draft import DraftArch, family_arch, tensor_shapes
from eaglecache.train.config import PARALLEL_FAMILIES, SEQUENTIAL_TTT_LENGTH

GIB = 2**30
# DeepSpeed ZeRO's reduce_bucket_size default (elements): train/deepspeed_engine.py leaves it unset and
# turns contiguous_gradients on, so ZeRO-3 allocates one bucket of this size in the dtype when it starts
REDUCE_BUCKET_ELEMENTS = 500_000_000
# CUDA context, NCCL's buffers and the caching allocator's fragmentation: kept free of the model's figure
ALLOWANCE_FRACTION = 0.10
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class MemoryInputs:
    hidden: int
    target_hidden: int
    num_aux: int
    vocab: int
    tied: bool
    intermediate: int
    q_width: int
    kv_width: int
    num_layers: int
    params: int
    ttt: int
    micro_batch: int
    dtype_bytes: int
    checkpointing: bool
    attention: str  # "flex" (CUDA) or "split" (CPU): what one step saves differs
    loss_chunk_tokens: int
    ranks: int
    accumulation: int
    loader_workers: int
    prefetch: int
    reduce_bucket: int = REDUCE_BUCKET_ELEMENTS


def memory_inputs(config, target: dict, ranks: int, *, dtype: str | None = None,
                  attention: str = "flex") -> MemoryInputs:
    """The sizes the model reads: the draft as train/main.py builds it from ``target`` (the text config), the
    train.* settings, ``ranks`` sharing ZeRO-3; ``dtype`` resolves train.dtype's auto (bfloat16 on a GPU)."""
    tc, dc = config.train, config.train.draft
    num_layers = int(target["num_hidden_layers"])
    aux = list(dc.aux_layer_ids or config.precompute_aux_layer_ids(num_layers))
    arch = DraftArch.from_target(target, aux, None, dc.intermediate_size, dc.num_attention_heads,
                                 dc.num_key_value_heads)
    # the mask token's id does not change any size
    fields = family_arch(dc.family, dc.aux_norm, 0 if dc.family in PARALLEL_FAMILIES else None, dc.num_layers)
    arch = replace(arch, **fields)
    if dc.family == "dflash":
        raise ValueError("the memory model covers the EAGLE families (eagle3, eagle3.1, peagle), not dflash")
    ttt = tc.ttt_length or (config.serve.num_speculative_tokens if dc.family in PARALLEL_FAMILIES
                            else SEQUENTIAL_TTT_LENGTH)
    name = dtype or (tc.dtype if tc.dtype != "auto" else "bfloat16")
    return MemoryInputs(
        hidden=arch.hidden_size, target_hidden=arch.target_hidden_size, num_aux=len(aux), vocab=arch.vocab_size,
        tied=bool(target.get("tie_word_embeddings", False)), intermediate=arch.intermediate_size,
        q_width=arch.num_attention_heads * arch.head_dim, kv_width=arch.num_key_value_heads * arch.head_dim,
        num_layers=arch.num_layers, params=sum(math.prod(s) for s in tensor_shapes(arch).values()),
        ttt=ttt, micro_batch=tc.micro_batch_size, dtype_bytes=DTYPE_BYTES[name],
        checkpointing=tc.gradient_checkpointing, attention=attention, loss_chunk_tokens=tc.loss_chunk_tokens,
        ranks=ranks, accumulation=max(1, tc.global_batch_size // (tc.micro_batch_size * ranks)),
        loader_workers=tc.loader_workers, prefetch=tc.prefetch)


@dataclass(frozen=True)
class Row:
    name: str
    nbytes: float
    formula: str

    @property
    def gib(self) -> float:
        return self.nbytes / GIB


def batch_bytes_per_token(m: MemoryInputs) -> int:
    """One token of a micro-batch: int64 id, uint8 mask, bf16 aux and final states (the cache's dtype)."""
    return 8 + 1 + 2 * (m.num_aux + 1) * m.target_hidden


def step_saved_bytes_per_token(m: MemoryInputs) -> int:
    """What one TTT step through every layer saves for its backward, per token (inside the checkpoint, so
    only one step's worth exists at a time when checkpointing). Per layer: two RMSNorms save 8 B per element
    each (the fp32 copy and the normalized value in bf16, or in fp32 the normalized value and its scaled
    output), the rotated query and the attention output reshaped for o_proj (q x e each), the recomputed key
    and value (2 kv x e), the attention kernel's own saves, and the MLP's gate, silu, up and product (4 I x e).
    """
    e, q, kv, k = m.dtype_bytes, m.q_width, m.kv_width, m.ttt
    if m.attention == "split":  # fp32 query and merged output, the earlier steps' keys/values stacked in fp32
        kernel = q * e + 8 * q + 2 * k * kv * 4
    else:  # flex: the keys and values of all steps concatenated, the output
        kernel = q * e + 2 * k * kv * e
    return m.num_layers * (16 * m.hidden + 2 * q * e + 2 * kv * e + kernel + 4 * m.intermediate * e)


def kept_bytes_per_token(m: MemoryInputs) -> int:
    """What the unroll keeps from forward until backward reaches it, per token: fc's output (and its fp32
    input when training in fp32: bf16 aux features are cast), the normed embeddings and their q/k/v half
    (computed once for all steps), each step's output state and keys/values (inputs of the next step's
    checkpoint; ``split`` also keeps fp32 copies of steps 1.. keys/values), each step's output norm (its fp32
    copy in bf16, the normalized value) and the loss's gradient w.r.t. the K normed states, computed in
    forward (train/loss.py). Without checkpointing every step's saves stay as well."""
    e, h, kv, k = m.dtype_bytes, m.hidden, m.kv_width, m.ttt
    fc = h * e + (m.num_aux * m.target_hidden * 4 if e == 4 else 0)
    embeds = 2 * h * e + (m.q_width + 2 * kv) * e
    steps = k * (h * e + m.num_layers * 2 * kv * e)
    if m.attention == "split":
        steps += (k - 1) * m.num_layers * 2 * kv * 4
    norms = k * ((4 if e == 2 else 0) + e) * h
    loss = k * h * e + k * 9  # the gradient, the step masks (bool) and weights (fp64)
    saved = 0 if m.checkpointing else k * step_saved_bytes_per_token(m)
    return fc + embeds + steps + norms + loss + saved


def loss_window_bytes(m: MemoryInputs, tokens: int) -> tuple[int, str]:
    """The forward of the loss on top of what is kept: the K normed states twice (the list and its stack), the
    teacher's normed state, and one chunk: the teacher's fp32 probabilities over its rows (span + K - 1
    positions), a step's fp32 logits over its span, the previous step's (still bound to ``q`` and
    ``grad_logits`` until they are reassigned) and the fp32 product ``linalg.vecdot`` makes: the peak
    benchmarks/bench_memory.py finds."""
    e, b = m.dtype_bytes, m.micro_batch
    span = max(1, m.loss_chunk_tokens // b)
    rows, n = b * min(span + m.ttt - 1, tokens), b * min(span, tokens)
    per_token = (2 * m.ttt + 1) * m.hidden * e
    chunk = 4 * rows + 12 * n
    return tokens * b * per_token + m.vocab * chunk, f"T x B x {per_token:,} B + V x {chunk:,} B"


def backward_window_bytes(m: MemoryInputs, tokens: int) -> tuple[int, str]:
    """Backward on top of what is kept: one step recomputed (its saves) and the gradients inside it (the MLP's
    three I-wide ones and the two norms' fp32 ones, 8 H). The loss gradient scaled by the loss's replaces
    the saved one before any step runs, so it is in the kept row once. Without checkpointing the saves are
    already kept."""
    e = m.dtype_bytes
    recompute = step_saved_bytes_per_token(m) if m.checkpointing else 0
    per_token = recompute + m.num_layers * (3 * m.intermediate * e + 8 * m.hidden)
    return tokens * m.micro_batch * per_token, f"T x B x {per_token:,} B"


def gpu_rows(m: MemoryInputs, tokens: int) -> list[Row]:
    """The rows of the table, one per component; their sum is the rank's peak."""
    e, b = m.dtype_bytes, m.micro_batch
    heads = 1 if m.tied else 2
    shard = -(-m.params // m.ranks)
    per_param = e + (4 if e == 2 else 0) + 8 + e
    loss, loss_formula = loss_window_bytes(m, tokens)
    backward, backward_formula = backward_window_bytes(m, tokens)
    window = (max(loss, backward), f"max(loss forward {loss / GIB:.2f} = {loss_formula}, "
              f"backward {backward / GIB:.2f} = {backward_formula})")
    return [
        Row("frozen embedding + LM head", heads * m.vocab * m.hidden * e,
            f"{heads} x V {m.vocab:,} x H {m.hidden:,} x {e} B"),
        Row("draft states (ZeRO-3 shard)", shard * per_param, f"P/N {shard:,} x {per_param} B"),
        Row("gradient reduce bucket", m.reduce_bucket * e, f"{m.reduce_bucket:,} x {e} B"),
        Row("micro-batch", tokens * b * batch_bytes_per_token(m), f"T x B x {batch_bytes_per_token(m):,} B"),
        Row("draft gathered for fwd/bwd", m.params * e, f"P {m.params:,} x {e} B"),
        Row(f"kept across TTT {m.ttt}", tokens * b * kept_bytes_per_token(m),
            f"T x B x {kept_bytes_per_token(m):,} B"),
        Row("peak working set", window[0], window[1]),
    ]


def loader_micro_batches(m: MemoryInputs) -> int:
    """Micro-batches the loader holds while a step computes: the step's own, plus prefetch steps read
    ahead (less the one being handed over) when it has workers (train/loader.py)."""
    if m.loader_workers == 0:
        return m.accumulation
    return (m.prefetch + 1) * m.accumulation - 1


def host_row(m: MemoryInputs, tokens: int) -> Row:
    count = loader_micro_batches(m)
    return Row("loader buffers (host, pinned)", count * tokens * m.micro_batch * batch_bytes_per_token(m),
               f"{count} micro-batches x T x B x {batch_bytes_per_token(m):,} B")


def total_bytes(m: MemoryInputs, tokens: int) -> float:
    return sum(row.nbytes for row in gpu_rows(m, tokens))


def longest_fitting(m: MemoryInputs, budget: float, step: int = 1024, limit: int = 1 << 22) -> int:
    """The longest sequence, in multiples of ``step`` tokens, whose peak stays within ``budget`` bytes (0: none)."""
    if total_bytes(m, step) > budget:
        return 0
    low, high = 1, limit // step  # the total grows with T: bisect on multiples of step
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total_bytes(m, mid * step) <= budget else (low, mid - 1)
    return low * step


def memory_table(m: MemoryInputs, tokens: int, gpu_memory_gib: float) -> list[str]:
    """The printed table: the inputs, one row per component, the total, and which lengths fit."""
    allowance = ALLOWANCE_FRACTION * gpu_memory_gib
    budget = (gpu_memory_gib - allowance) * GIB
    dtype = {2: "bfloat16", 4: "float32"}[m.dtype_bytes]
    lines = [
        "",
        f"training memory per GPU: {m.ranks} ranks (N) x {gpu_memory_gib:g} GiB, sequence T {tokens:,}, "
        f"micro-batch B {m.micro_batch}, TTT K {m.ttt}, {dtype}, "
        f"gradient checkpointing {'on' if m.checkpointing else 'off'}",
        f"draft P {m.params:,} parameters ({m.num_layers} layer(s): H {m.hidden}, q {m.q_width}, kv "
        f"{m.kv_width}, I {m.intermediate}), V {m.vocab:,}, A {m.num_aux} aux states of {m.target_hidden}",
        f"{'component':<30}{'GiB':>9}  formula",
    ]
    rows = gpu_rows(m, tokens)
    lines += [f"{row.name:<30}{row.gib:>9.2f}  {row.formula}" for row in rows]
    total = sum(row.nbytes for row in rows)
    verdict = "fits" if total <= budget else "does NOT fit"
    lines.append(f"{'total':<30}{total / GIB:>9.2f}  {verdict} in {gpu_memory_gib:g} GiB less "
                 f"{allowance:.1f} GiB ({ALLOWANCE_FRACTION:.0%}) for CUDA context, NCCL and fragmentation")
    host = host_row(m, tokens)
    lines.append(f"{host.name:<30}{host.gib:>9.2f}  {host.formula} (GA {m.accumulation}, "
                 f"prefetch {m.prefetch}, {m.loader_workers} workers)")
    fits = longest_fitting(m, budget)
    lines.append(f"longest sequence that fits: {fits:,} tokens" if fits else
                 "no sequence of 1,024 tokens fits")
    for length in (8192, 16384, 32768, 65536, 131072):
        size = total_bytes(m, length) / GIB
        lines.append(f"  T {length:>7,}: {size:>7.2f} GiB  {'fits' if size * GIB <= budget else 'over'}")
    lines.append("assumes every micro-batch is T tokens long (micro-batches pad to their longest sample) and "
                 "DeepSpeed's default buckets; GiB = 2^30 bytes")
    return lines
