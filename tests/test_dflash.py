"""The DFlash loss and its gradients equal a plainly written reference (explicit loops over anchors and slots).

The reference shares no code with train/: for each anchor (the last verified position t) it builds
the block (token t + 1, then mask tokens), runs every layer one query at a time over the keys that
query sees in vLLM's DFlash forward (the context keys of positions 0..t, made from
hidden_norm(fc(aux)) by that layer's k/v projections, and all keys of the block), and takes the loss
with full logits, slot k + 1 against the teacher of TTT step k.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import reference_rms, reference_rope
from eaglecache.formats.draft import DraftArch, family_arch
from eaglecache.train.dflash import DFlashDraft
from eaglecache.train.loader import shift_sample_tensors
from eaglecache.train.target_head import TargetHead
from eaglecache.train.ttt import TTTSettings

H, HEADS, KV, D, INTER, VOCAB, NUM_AUX, LAYERS, MASK = 32, 4, 2, 8, 48, 50, 3, 8, 7
THETA, EPS = 10000.0, 1e-5


def make_draft(num_layers=2, draft_vocab=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = TargetHead(torch.randn(VOCAB, H, generator=gen), 1 + 0.1 * torch.randn(H, generator=gen),
                        torch.randn(VOCAB, H, generator=gen) / math.sqrt(H), EPS, torch.float64)
    arch = DraftArch(hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV,
                     head_dim=D, rms_norm_eps=EPS, vocab_size=VOCAB, draft_vocab_size=draft_vocab or VOCAB,
                     target_hidden_size=H, target_num_hidden_layers=LAYERS, aux_layer_ids=[2, 4, 5],
                     max_position_embeddings=64, initializer_range=0.2, rope={"rope_theta": THETA},
                     **family_arch("dflash", mask_token_id=MASK, num_layers=num_layers))
    d2t = None
    if draft_vocab:
        d2t = torch.sort(torch.randperm(VOCAB, generator=gen)[:draft_vocab]).values - torch.arange(draft_vocab)
    draft = DFlashDraft(arch, target, TTTSettings(), d2t)
    draft.init_weights(seed)
    with torch.no_grad():  # non-trivial norms, so their gradients are checked too
        for p in draft.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return draft.double()


def make_batch(batch=2, length=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) < 0.7).to(torch.uint8)
    mask[-1, -3:] = 0
    aux = torch.randn(batch, length, NUM_AUX, H, generator=gen, dtype=torch.float64)
    final = 3 * torch.randn(batch, length, H, generator=gen, dtype=torch.float64)
    return ids, mask, aux, final


def rms(x, w):
    return reference_rms(x, w, EPS)


def rope(x, pos):
    return reference_rope(x, pos, THETA)


def reference_loss(draft, ids, mask, aux, final, steps, decay):
    """(loss, correct per step, count per step) over the raw (unshifted) sample: anchor = raw position p."""
    P = dict(draft.named_parameters())
    tgt = draft.target
    W = P.get("lm_head.weight", tgt.lm_head_weight)
    draft_ids = draft.lm_head.draft_ids
    batch, length = ids.shape
    ce_sum, correct, count = [0.0] * steps, [0] * steps, [0] * steps
    for b in range(batch):
        context = [rms(aux[b, j].reshape(-1) @ P["fc.weight"].T, P["hidden_norm.weight"]) for j in range(length)]
        # the shifted anchor t reads raw token t + 1 with the context of raw positions 0..t
        for t in range(length):
            block = [ids[b, t + 1] if t + 1 < length else torch.tensor(0)] + [torch.tensor(MASK)] * steps
            h = [tgt.embed_weight[int(tok)] for tok in block]
            for layer in range(draft.arch.num_layers):
                L = lambda name: P[f"layers.{layer}.{name}"]  # noqa: E731
                x = [rms(v, L("input_layernorm.weight")) for v in h]
                q = [rope(rms((v @ L("self_attn.q_proj.weight").T).view(HEADS, D), L("self_attn.q_norm.weight")),
                          t + 1 + s) for s, v in enumerate(x)]
                keys = [rope(rms((c @ L("self_attn.k_proj.weight").T).view(KV, D), L("self_attn.k_norm.weight")), j)
                        for j, c in enumerate(context[:t + 1])]
                keys += [rope(rms((v @ L("self_attn.k_proj.weight").T).view(KV, D), L("self_attn.k_norm.weight")),
                              t + 1 + s) for s, v in enumerate(x)]
                values = [(c @ L("self_attn.v_proj.weight").T).view(KV, D) for c in context[:t + 1]]
                values += [(v @ L("self_attn.v_proj.weight").T).view(KV, D) for v in x]
                new_h = []
                for s in range(len(block)):
                    heads = []
                    for head in range(HEADS):
                        g = head // (HEADS // KV)
                        att = torch.softmax(torch.stack([k[g] for k in keys]) @ q[s][head] / math.sqrt(D), 0)
                        heads.append(att @ torch.stack([v[g] for v in values]))
                    r = h[s] + torch.cat(heads) @ L("self_attn.o_proj.weight").T
                    y = rms(r, L("post_attention_layernorm.weight"))
                    m = F.silu(y @ L("mlp.gate_proj.weight").T) * (y @ L("mlp.up_proj.weight").T)
                    new_h.append(r + m @ L("mlp.down_proj.weight").T)
                h = new_h
            for k in range(steps):  # slot k + 1 predicts raw token t + 2 + k
                if not (t + k < length - 1 and mask[b, t + k]):
                    continue
                target_logits = rms(final[b, t + 1 + k], tgt.norm_weight) @ tgt.lm_head_weight.T
                target_top = int(target_logits.argmax())
                logq = torch.log_softmax(rms(h[k + 1], P["norm.weight"]) @ W.T, -1)
                count[k] += 1
                if draft_ids is None:
                    correct[k] += int(int(logq.argmax()) == target_top)
                    ce_sum[k] = ce_sum[k] - (torch.softmax(target_logits, -1) * logq).sum()
                else:
                    correct[k] += int(int(draft_ids[logq.argmax()]) == target_top)
                    if target_top in draft_ids.tolist():
                        ce_sum[k] = ce_sum[k] - (torch.softmax(target_logits[draft_ids], -1) * logq).sum()
    loss = sum(decay ** k * ce_sum[k] / max(1, count[k]) for k in range(steps))
    return loss, correct, count


@pytest.mark.parametrize("num_layers,draft_vocab", [(1, None), (2, None), (2, 20)],
                         ids=["one-layer", "two-layers", "two-layers-reduced-vocab"])
def test_dflash_loss_and_gradients_match_the_plain_reference(num_layers, draft_vocab):
    steps, decay = 3, 0.8
    draft = make_draft(num_layers, draft_vocab)
    raw = make_batch()
    params = list(draft.parameters())
    ref_loss, ref_correct, ref_count = reference_loss(draft, *raw, steps, decay)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for checkpointing, score_budget in ((False, None), (True, None), (False, 100)):
        draft.settings = TTTSettings(ttt_length=steps, ttt_decay=decay, loss_chunk_tokens=5,
                                     gradient_checkpointing=checkpointing)
        for layer in draft.layers:  # a small budget: anchors attend in chunks of one or two
            layer.self_attn.score_budget = score_budget or type(layer.self_attn).score_budget
        loss, stats = draft(*shift_sample_tensors(*raw))
        grads = torch.autograd.grad(loss, params)
        assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12), (loss, ref_loss)
        assert stats[:, 1].tolist() == ref_correct and stats[:, 2].tolist() == ref_count
        for (name, _), g, rg in zip(draft.named_parameters(), grads, ref_grads):
            assert torch.allclose(g, rg, rtol=1e-8, atol=1e-10), (name, (g - rg).abs().max())
    assert sum(ref_count) > 0 and ref_loss > 0


def test_a_zero_embedding_row_as_mask_token_makes_every_mask_slot_the_same():
    """The pad-token bug: with the mask token's row zero, a one-layer draft's mask slots are identical."""
    ids, _, aux, _ = make_batch()
    outputs = {}
    for row in ("zero", "trained"):
        draft = make_draft(num_layers=1)
        if row == "zero":
            draft.target.embed_weight[MASK] = 0
        with torch.no_grad():
            block = draft.block_states(ids, aux, 4)  # [batch, anchor, slot, hidden]: slots 1.. are mask slots
        outputs[row] = (block[:, :, 1] - block[:, :, 2]).abs().max().item()
    assert outputs["zero"] == 0.0 and outputs["trained"] > 1e-3, outputs


def test_the_dflash_mask_token_defaults_to_a_trained_row_and_a_zero_row_is_refused(tiny_target):
    from eaglecache.config import load_config
    from eaglecache.errors import UserError
    from eaglecache.formats.draft import default_mask_token_id, embedding_row_is_zero
    from eaglecache.target import default_aux_layer_ids, target_config
    from eaglecache.train.main import build_draft

    config = target_config(tiny_target)
    embed = TargetHead.from_target(tiny_target).embed_weight
    pad = config["pad_token_id"]
    assert embedding_row_is_zero(embed, pad)  # transformers' padding_idx row: the bug's cause
    chosen = default_mask_token_id(config, "dflash", embed)
    assert chosen != pad and not embedding_row_is_zero(embed, chosen)
    assert default_mask_token_id(config, "peagle") == pad  # P-EAGLE learns mask_hidden: unchanged
    metadata = {"aux_layer_ids": default_aux_layer_ids(config["num_hidden_layers"]),
                "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"]}
    settings = [f"target.path={tiny_target}", "train.draft.family=dflash", "train.dtype=float32"]
    draft, _ = build_draft(load_config(None, settings), tiny_target, metadata, None, torch.float32)
    assert draft.arch.mask_token_id == chosen
    with pytest.raises(UserError, match=f"mask_token_id {pad}: the target's embedding row of that token is zero"):
        build_draft(load_config(None, [*settings, f"train.draft.mask_token_id={pad}"]), tiny_target, metadata, None,
                    torch.float32)


def test_slots_reading_the_same_input_show_as_collapsed():
    """DFlash's mask slots all fed one zero row predict one token each: ``same_k`` (slot k predicts what slot
    k - 1 predicts) is 1 at every counted position, far above the data's own repetition (``repeat_k``)."""
    draft = make_draft(num_layers=1)
    with torch.no_grad():
        draft.target.embed_weight[MASK] = 0  # the padding row of the bug: every slot's input is zero
    draft.settings = TTTSettings(ttt_length=4, ttt_decay=0.8)
    with torch.no_grad():
        _, stats = draft(*shift_sample_tensors(*make_batch(batch=3, length=16, seed=3)))
    counted = stats[1:, 2]
    assert (counted > 0).all() and torch.equal(stats[1:, 3], counted)  # every slot after the first: the same token
    assert (stats[1:, 4] < counted).all()  # the data does not repeat itself everywhere
