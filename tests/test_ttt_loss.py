"""The TTT loss and its gradients equal a plainly written reference (explicit loops over steps and positions).

The reference below shares no code with train/: it reads the raw (unshifted)
sample, applies the load-time shift by indexing, computes attention one query
at a time over the keys TTT step k sees (the causal step-0 keys 0..t, plus the
keys of steps 1..k at position t), and the loss with full logits.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import reference_rms, reference_rope
from eaglecache.formats.draft import DraftArch, family_arch
from eaglecache.train.draft import Eagle3Draft
from eaglecache.train.loader import shift_sample_tensors
from eaglecache.train.target_head import TargetHead
from eaglecache.train.ttt import TTTSettings

H, HEADS, KV, D, INTER, VOCAB, NUM_AUX, LAYERS = 32, 4, 2, 8, 48, 50, 3, 8
THETA, EPS = 10000.0, 1e-5


FAMILIES = {"eagle3": {}, "eagle3.1": family_arch("eagle3.1", "joint"),
            "eagle3.1-per-layer": family_arch("eagle3.1", "per_layer"), "peagle": family_arch("peagle", mask_token_id=7),
            "eagle3-2-layers": family_arch("eagle3", num_layers=2),
            "eagle3.1-3-layers": family_arch("eagle3.1", "joint", num_layers=3),
            "peagle-2-layers": family_arch("peagle", mask_token_id=7, num_layers=2),
            "peagle-per-layer-norm": family_arch("peagle", "per_layer", mask_token_id=7)}


def make_draft(draft_vocab=None, seed=0, dtype=torch.float64, family="eagle3"):
    gen = torch.Generator().manual_seed(seed)
    target = TargetHead(torch.randn(VOCAB, H, generator=gen), 1 + 0.1 * torch.randn(H, generator=gen),
                        torch.randn(VOCAB, H, generator=gen) / math.sqrt(H), EPS, dtype)
    arch = DraftArch(hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV,
                     head_dim=D, rms_norm_eps=EPS, vocab_size=VOCAB, draft_vocab_size=draft_vocab or VOCAB,
                     target_hidden_size=H, target_num_hidden_layers=LAYERS, aux_layer_ids=[2, 4, 5],
                     max_position_embeddings=64, initializer_range=0.2, rope={"rope_theta": THETA},
                     **FAMILIES[family])
    d2t = None
    if draft_vocab:
        draft_ids = torch.sort(torch.randperm(VOCAB, generator=gen)[:draft_vocab]).values
        d2t = draft_ids - torch.arange(draft_vocab)
    draft = Eagle3Draft(arch, target, TTTSettings(), d2t)
    draft.init_weights(seed)
    with torch.no_grad():  # non-trivial norms (and mask state), so their gradients are checked too
        for name, p in draft.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            if name == "mask_hidden":
                p.copy_(torch.randn(p.shape, generator=gen))
    return draft.to(dtype)


def make_batch(batch=2, length=9, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) < 0.7).to(torch.uint8)
    mask[-1, -3:] = 0  # the last row is "padded"
    aux = torch.randn(batch, length, NUM_AUX, H, generator=gen, dtype=dtype)
    final = 3 * torch.randn(batch, length, H, generator=gen, dtype=dtype)
    return ids, mask, aux, final


# ------------------------------------------------------------------ the plain reference
def rms(x, w):
    return reference_rms(x, w, EPS)


def rope(x, pos):
    return reference_rope(x, pos, THETA)


def reference_loss(draft, ids, mask, aux, final, steps, decay, collapse=False):
    """(loss, correct per step, count per step) with plain loops over the raw (unshifted) inputs; with
    ``collapse``, also per step the counted positions where the draft's argmax equals the step before's and
    where the teacher's does."""
    P = dict(draft.named_parameters())
    tgt = draft.target
    W = P.get("lm_head.weight", tgt.lm_head_weight)
    draft_ids = draft.lm_head.draft_ids
    batch, length = ids.shape
    ce_sum, correct, count = [0.0] * steps, [0] * steps, [0] * steps
    same, repeat = [0] * steps, [0] * steps
    arch = draft.arch

    def combine(x):  # x [A*H]: EAGLE 3.1's aux norms, then fc
        if arch.aux_norm == "joint":
            x = rms(x, P["input_norm.weight"])
        elif arch.aux_norm == "per_layer":
            x = torch.cat([rms(c, P[f"fc_norm.{i}.weight"]) for i, c in enumerate(x.chunk(NUM_AUX))])
        return x @ P["fc.weight"].T

    def attend(q, keys, values, t, k):  # step k at position t: step 0's keys 0..t, then steps 1..k at t
        heads_out = []
        for head in range(HEADS):
            g = head // (HEADS // KV)
            kk = [keys[0][s][g] for s in range(t + 1)] + [keys[j][t][g] for j in range(1, k + 1)]
            vv = [values[0][s][g] for s in range(t + 1)] + [values[j][t][g] for j in range(1, k + 1)]
            att = torch.softmax(torch.stack(kk) @ q[head] / math.sqrt(D), 0)
            heads_out.append(att @ torch.stack(vv))
        return torch.cat(heads_out)

    def mlp(r, prefix):
        y = rms(r, P[f"{prefix}.post_attention_layernorm.weight"])
        m = F.silu(y @ P[f"{prefix}.mlp.gate_proj.weight"].T) * (y @ P[f"{prefix}.mlp.up_proj.weight"].T)
        return r + m @ P[f"{prefix}.mlp.down_proj.weight"].T

    for b in range(batch):
        h = [combine(aux[b, t].reshape(-1)) for t in range(length)]
        # keys[i][j][t]: [kv, d], made by layer i at step j at position t
        keys, values = [[] for _ in range(arch.num_layers)], [[] for _ in range(arch.num_layers)]
        for k in range(steps):
            qs, ks, vs = [], [], []
            if arch.parallel and k > 0:  # P-EAGLE's slots: the mask token and state, nothing carried
                h = [combine(P["mask_hidden"][0]) for _ in range(length)]
            for t in range(length):
                tok = ids[b, t + 1 + k] if t + 1 + k < length else 0
                if arch.parallel and k > 0:
                    tok = arch.mask_token_id
                x = torch.cat([rms(tgt.embed_weight[tok], P["midlayer.input_layernorm.weight"]),
                               rms(h[t], P["midlayer.hidden_norm.weight"])])
                qs.append(rope((x @ P["midlayer.self_attn.q_proj.weight"].T).view(HEADS, D), t + k))
                ks.append(rope((x @ P["midlayer.self_attn.k_proj.weight"].T).view(KV, D), t + k))
                vs.append((x @ P["midlayer.self_attn.v_proj.weight"].T).view(KV, D))
            keys[0].append(ks)
            values[0].append(vs)
            new_h = [mlp(h[t] + attend(qs[t], keys[0], values[0], t, k) @ P["midlayer.self_attn.o_proj.weight"].T,
                         "midlayer") for t in range(length)]
            for i in range(1, arch.num_layers):  # a plain pre-norm layer over the previous layer's output
                pre = f"layers.{i}"
                xs = [rms(x, P[f"{pre}.input_layernorm.weight"]) for x in new_h]
                qs = [rope((x @ P[f"{pre}.self_attn.q_proj.weight"].T).view(HEADS, D), t + k) for t, x in enumerate(xs)]
                keys[i].append([rope((x @ P[f"{pre}.self_attn.k_proj.weight"].T).view(KV, D), t + k)
                                for t, x in enumerate(xs)])
                values[i].append([(x @ P[f"{pre}.self_attn.v_proj.weight"].T).view(KV, D) for x in xs])
                new_h = [mlp(new_h[t] + attend(qs[t], keys[i], values[i], t, k) @ P[f"{pre}.self_attn.o_proj.weight"].T,
                             pre) for t in range(length)]
            tops = {}  # t -> (draft's argmax, teacher's argmax) at step k, for step k + 1
            for t in range(length):
                if t + k < length - 1:
                    target_logits = rms(final[b, t + 1 + k], tgt.norm_weight) @ tgt.lm_head_weight.T
                    draft_top = int(torch.argmax(rms(new_h[t], P["norm.weight"]) @ W.T))
                    tops[t] = (int(draft_ids[draft_top]) if draft_ids is not None else draft_top,
                               int(target_logits.argmax()))
                # loss mask not shifted, last position zeroed, then shifted by k with the ids
                if not (t + k < length - 1 and mask[b, t + k]):
                    continue
                target_top = tops[t][1]
                logq = torch.log_softmax(rms(new_h[t], P["norm.weight"]) @ W.T, -1)
                count[k] += 1
                if k > 0:
                    same[k] += int(tops[t][0] == previous_tops[t][0])
                    repeat[k] += int(target_top == previous_tops[t][1])
                if draft_ids is None:
                    correct[k] += int(int(logq.argmax()) == target_top)
                    ce_sum[k] = ce_sum[k] - (torch.softmax(target_logits, -1) * logq).sum()
                else:
                    correct[k] += int(int(draft_ids[logq.argmax()]) == target_top)
                    if target_top in draft_ids.tolist():
                        p = torch.softmax(target_logits[draft_ids], -1)
                        ce_sum[k] = ce_sum[k] - (p * logq).sum()
            h = [rms(x, P["norm.weight"]) for x in new_h] if arch.norm_output else new_h
            previous_tops = tops
    loss = sum(decay ** k * ce_sum[k] / max(1, count[k]) for k in range(steps))
    return (loss, correct, count, same, repeat) if collapse else (loss, correct, count)


# ------------------------------------------------------------------ the tests
def run_implementation(draft, raw, steps, decay, attention="reference", chunk=4, checkpointing=False):
    batch = shift_sample_tensors(*raw)
    draft.settings = TTTSettings(ttt_length=steps, ttt_decay=decay, loss_chunk_tokens=chunk,
                                 attention=attention, gradient_checkpointing=checkpointing)
    loss, stats = draft(*batch)
    return loss, stats


@pytest.mark.parametrize("draft_vocab,family", [(None, "eagle3"), (20, "eagle3"), (None, "eagle3.1"),
                                                (20, "eagle3.1-per-layer"), (None, "peagle"), (20, "peagle"),
                                                (None, "eagle3-2-layers"), (None, "eagle3.1-3-layers"),
                                                (20, "peagle-2-layers")],
                         ids=["full-vocab", "reduced-vocab", "eagle3.1", "eagle3.1-per-layer-reduced", "peagle",
                              "peagle-reduced", "eagle3-2-layers", "eagle3.1-3-layers", "peagle-2-layers-reduced"])
def test_ttt_loss_and_gradients_match_the_plain_reference(draft_vocab, family):
    steps, decay = 4, 0.8
    draft = make_draft(draft_vocab, family=family)
    raw = make_batch()
    params = [p for p in draft.parameters()]
    ref_loss, ref_correct, ref_count, ref_same, ref_repeat = reference_loss(draft, *raw, steps, decay, collapse=True)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for attention in ("reference", "split"):
        loss, stats = run_implementation(draft, raw, steps, decay, attention=attention)
        grads = torch.autograd.grad(loss, params)
        assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12), (attention, loss, ref_loss)
        assert stats[:, 1].tolist() == ref_correct and stats[:, 2].tolist() == ref_count
        assert stats[:, 3].tolist() == ref_same and stats[:, 4].tolist() == ref_repeat  # slot collapse, data repeats
        for (name, _), g, rg in zip(draft.named_parameters(), grads, ref_grads):
            assert torch.allclose(g, rg, rtol=1e-8, atol=1e-10), (attention, name, (g - rg).abs().max())
    assert sum(ref_count) > 0 and ref_loss > 0


def test_chunking_and_checkpointing_do_not_change_loss_or_gradients():
    steps, decay = 3, 0.7
    draft = make_draft()
    raw = make_batch(length=11)
    params = list(draft.parameters())
    results = []
    for chunk, checkpointing in ((1, False), (5, True), (1000, False)):
        loss, stats = run_implementation(draft, raw, steps, decay, attention="split", chunk=chunk,
                                         checkpointing=checkpointing)
        results.append((loss, stats, torch.autograd.grad(loss, params)))
    for loss, stats, grads in results[1:]:
        assert torch.allclose(loss, results[0][0], rtol=1e-12)
        assert torch.equal(stats[:, 1:], results[0][1][:, 1:])  # correct and count: exact
        assert torch.allclose(stats[:, 0], results[0][1][:, 0], rtol=1e-12)
        assert all(torch.allclose(g, g0, rtol=1e-10, atol=1e-13) for g, g0 in zip(grads, results[0][2]))


def test_padding_positions_change_nothing():
    """A row's loss does not depend on what sits after its last real token (causal, masked)."""
    steps = 3
    draft = make_draft()
    ids, mask, aux, final = make_batch(batch=1, length=10)
    mask[0, 6:] = 0
    loss_a, _ = run_implementation(draft, (ids, mask, aux, final), steps, 0.8)
    ids2, aux2, final2 = ids.clone(), aux.clone(), final.clone()
    # a valid row (t + k <= 5) reads tokens x[<= t + 1 + k] <= 6, aux[<= 5] and teachers final[<= 6]
    ids2[0, 7:] = 7
    aux2[0, 6:] += 1.0
    final2[0, 7:] -= 2.0
    loss_b, _ = run_implementation(draft, (ids2, mask, aux2, final2), steps, 0.8)
    assert torch.allclose(loss_a, loss_b, rtol=1e-12)
