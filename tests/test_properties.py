"""Generated adversarial shapes (hypothesis) for the loader, the TTT masks, the decode walk and the loss.

Sample lengths run from 1 to ttt_length + 2 (a micro-batch no longer than the TTT depth once
crashed training) and beyond, masks are all-zero, all-one or random, micro-batches mix lengths,
and a reduced vocab may hold none of the target's argmax tokens. Each property compares the
code with a plain rewrite of its documented rule:

- the loader's micro-batch is the samples truncated, shifted by one for TTT and right-padded;
- step k's mask is the loss mask k positions ahead, its weights decay**k / count_k;
- ``decode_walk`` equals a token-by-token simulation of greedy speculative decoding, where the
  target accepts draft tokens while they are its own greedy choice and adds its own token after;
- the TTT loss and its statistics equal test_ttt_loss.py's plain-loop reference.

Few examples each (no example database is written) keep the file well under a minute.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eaglecache.formats.cache_reader import Sample
from eaglecache.train.loader import InMemoryFeatures, SamplePlan, StreamingLoader
from eaglecache.train.metrics import decode_walk
from eaglecache.train.ttt import TTTSettings, step_weights
from test_ttt_loss import EPS, NUM_AUX, VOCAB, H, make_draft, reference_loss, rms

SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def lengths_for(draw, ttt_length, most=16):
    """A sample length: around the TTT depth (1 .. K + 2) half of the time, else up to ``most``."""
    return draw(st.one_of(st.integers(1, ttt_length + 2), st.integers(1, most)))


@st.composite
def mask_of(draw, length):
    kind = draw(st.sampled_from(["none", "all", "random"]))
    if kind == "none":
        return np.zeros(length, np.uint8)
    if kind == "all":
        return np.ones(length, np.uint8)
    return np.array(draw(st.lists(st.integers(0, 1), min_size=length, max_size=length)), np.uint8)


@st.composite
def samples_of(draw, ttt_length, count, dtype=torch.bfloat16, hidden=8, vocab=VOCAB):
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for sid in range(count):
        n = draw(lengths_for(ttt_length))
        samples.append(Sample(
            input_ids=torch.randint(0, vocab, (n,), generator=gen).numpy().astype(np.int32),
            loss_mask=draw(mask_of(n)),
            aux=torch.randn(n, NUM_AUX, hidden, generator=gen, dtype=torch.float64).to(dtype),
            final=3 * torch.randn(n, hidden, generator=gen, dtype=torch.float64).to(dtype), sample_id=sid))
    return samples


def loader_over(samples, max_seq_length, micro_batch_size=1):
    source = InMemoryFeatures(samples, {"aux_layer_ids": [2, 4, 5]})
    plan = SamplePlan(source.sample_ids, source.num_tokens_array(), seed=0, global_batch_size=len(samples),
                      micro_batch_size=micro_batch_size, world_size=1)
    return StreamingLoader(source, plan, rank=0, max_seq_length=max_seq_length, total_steps=1, workers=0)


# ------------------------------------------------------------------ the loader
@SETTINGS
@given(data=st.data(), count=st.integers(1, 4), max_seq_length=st.integers(1, 12))
def test_a_micro_batch_is_its_samples_truncated_shifted_and_padded(data, count, max_seq_length):
    samples = data.draw(samples_of(3, count))
    batch = loader_over(samples, max_seq_length).load_micro_batch(list(range(count)))
    width = min(max_seq_length, max(len(s.input_ids) for s in samples))
    assert batch.input_ids.shape == batch.loss_mask.shape == (count, width)
    assert batch.aux.shape == (count, width, NUM_AUX, 8) and batch.final.shape == (count, width, 8)
    assert batch.num_tokens == sum(min(len(s.input_ids), max_seq_length) for s in samples)
    for row, s in enumerate(samples):
        n = min(len(s.input_ids), max_seq_length)
        for t in range(width):
            inside = t + 1 < n  # position t has a next token of its own sample
            assert batch.input_ids[row, t] == (int(s.input_ids[t + 1]) if inside else 0)
            assert batch.loss_mask[row, t] == (int(s.loss_mask[t]) if inside else 0)
            want_final = s.final[t + 1] if inside else torch.zeros_like(s.final[0])
            assert torch.equal(batch.final[row, t], want_final)
            want_aux = s.aux[t] if t < n else torch.zeros_like(s.aux[0])
            assert torch.equal(batch.aux[row, t], want_aux)


@SETTINGS
@given(data=st.data(), micro=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3))
def test_a_step_holds_every_sample_of_its_global_batch_once_in_micro_batches_of_its_size(data, micro, groups):
    samples = data.draw(samples_of(3, micro * groups))
    loader = loader_over(samples, max_seq_length=8, micro_batch_size=micro)
    (step, batches), = list(loader)
    assert step == 0 and loader.state_dict()["step"] == 1
    assert [len(b.sample_ids) for b in batches] == [micro] * groups
    assert sorted(i for b in batches for i in b.sample_ids) == list(range(len(samples)))
    for b in batches:  # bucketing: each micro-batch is padded to its own longest sample only
        assert b.input_ids.shape[1] == min(8, max(len(samples[i].input_ids) for i in b.sample_ids))


# ------------------------------------------------------------------ the TTT masks
@SETTINGS
@given(data=st.data(), steps=st.integers(1, 7), batch=st.integers(1, 3), decay=st.floats(0.1, 1.0))
def test_step_k_masks_the_loss_mask_k_ahead_with_weights_decay_k_over_its_count(data, steps, batch, decay):
    length = data.draw(lengths_for(steps))
    mask = torch.from_numpy(np.stack([data.draw(mask_of(length)) for _ in range(batch)]))
    masks, weights = step_weights(mask, steps, decay)
    assert masks.shape == weights.shape == (steps, batch, length)
    for k in range(steps):
        want = [[bool(t + k < length and mask[b, t + k]) for t in range(length)] for b in range(batch)]
        assert masks[k].tolist() == want
        count = sum(map(sum, want))
        assert torch.allclose(weights[k], masks[k].double() * decay ** k / max(1, count), rtol=0, atol=0)
        assert float(weights[k].sum()) == pytest.approx(decay ** k if count else 0.0, rel=1e-12)


# ------------------------------------------------------------------ the decode walk
def simulate_greedy_decoding(agree, generated, depth):
    """(accepted draft tokens, rounds) of greedy speculative decoding over one row, token by token.

    Token i is the target's (greedy) output where ``generated[i]``; the decoder has produced tokens
    up to ``last``. If it goes on producing (token last + 1 is the target's too) it drafts up to
    ``depth`` tokens: draft token n (for token last + 1 + n) is the target's own choice when
    ``agree[n][last - 1]`` (TTT step n at position last - 1 predicts token last + 1 + n). The target
    verifies them in order and keeps them while they match, and only while they are still its output
    (a turn's end stops the chain); then it adds its own next token. Where the target does not
    generate, the decoder only reads (prefill) until the next generated token.
    """
    length = len(generated)

    def target_generates(i):
        return 0 <= i < length and bool(generated[i])

    accepted = rounds = 0
    last = 1  # token 0 has no position before it: the first draft can follow token 1
    while last < length:
        if not (target_generates(last) and target_generates(last + 1)):
            last += 1
            continue
        kept = 0
        while kept < depth and target_generates(last + 1 + kept) and agree[kept][last - 1]:
            kept += 1
        accepted += kept
        rounds += 1
        last += kept + 1  # the accepted tokens, then the target's own
    return accepted, rounds


@SETTINGS
@given(data=st.data(), steps=st.integers(1, 7), batch=st.integers(1, 3), p_agree=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_the_walk_equals_a_simulation_of_greedy_speculative_decoding(data, steps, batch, p_agree):
    length = data.draw(lengths_for(steps, most=24))
    mask = torch.from_numpy(np.stack([data.draw(mask_of(length)) for _ in range(batch)]))
    seed = data.draw(st.integers(0, 2**16))
    agree = torch.rand(steps, batch, length, generator=torch.Generator().manual_seed(seed)) < p_agree
    totals = decode_walk(agree, mask)
    assert totals.shape == (steps, 2)
    for depth in range(1, steps + 1):
        want = [simulate_greedy_decoding(agree[:, b].tolist(), mask[b].tolist(), depth) for b in range(batch)]
        assert totals[depth - 1].tolist() == [sum(a for a, _ in want), sum(r for _, r in want)], depth


# ------------------------------------------------------------------ the loss
DRAFTS = {}


def draft_for(reduced: bool):
    """One float64 draft per vocab kind (forward only: it is never changed)."""
    if reduced not in DRAFTS:
        DRAFTS[reduced] = make_draft(draft_vocab=8 if reduced else None)
    return DRAFTS[reduced]


def use_draft_vocab(draft, draft_ids: torch.Tensor) -> None:
    """Point the reduced LM head at other target tokens (the rows keep their values)."""
    head = draft.lm_head
    head.draft_ids = draft_ids.clone()
    head.d2t = draft_ids - torch.arange(len(draft_ids))
    head.t2d = torch.zeros(VOCAB, dtype=torch.bool)
    head.t2d[draft_ids] = True


def raw_batch(samples):
    """The unshifted, right-padded batch the reference reads; the loader's rule written out: no loss
    where a position has no next token of its own sample (its last one and the padding)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.int64)
    mask = torch.zeros(len(samples), width, dtype=torch.uint8)
    aux = torch.zeros(len(samples), width, NUM_AUX, H, dtype=torch.float64)
    final = torch.zeros(len(samples), width, H, dtype=torch.float64)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
        mask[row, :n - 1] = torch.from_numpy(s.loss_mask[:n - 1])
        aux[row, :n], final[row, :n] = s.aux, s.final
    return ids, mask, aux, final


@settings(SETTINGS, max_examples=25)
@given(data=st.data(), steps=st.integers(1, 5), count=st.integers(1, 3),
       vocab=st.sampled_from(["full", "reduced", "reduced-none-in-vocab"]))
def test_the_ttt_loss_of_generated_batches_equals_the_plain_reference(data, steps, count, vocab):
    samples = data.draw(samples_of(steps, count, dtype=torch.float64, hidden=H))
    draft = draft_for(vocab != "full")
    raw = raw_batch(samples)
    if vocab != "full":
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        choice = torch.randperm(VOCAB, generator=gen)
        if vocab == "reduced-none-in-vocab":  # draft tokens among those no position's teacher picks
            teacher_top = (rms(raw[3], draft.target.norm_weight) @ draft.target.lm_head_weight.T).argmax(-1)
            choice = torch.tensor([i for i in choice.tolist() if i not in set(teacher_top.flatten().tolist())])
            assume(len(choice) >= 8)
        use_draft_vocab(draft, torch.sort(choice[:8]).values)
    loader = loader_over(samples, max_seq_length=64)
    batch = loader.load_micro_batch(list(range(count)))
    draft.settings = TTTSettings(ttt_length=steps, ttt_decay=0.8, loss_chunk_tokens=data.draw(st.integers(1, 9)),
                                 attention=data.draw(st.sampled_from(["reference", "split"])))
    with torch.no_grad():
        loss, stats = draft(*batch.model_inputs())
        ref_loss, ref_correct, ref_count = reference_loss(draft, *raw, steps, 0.8)
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-9, abs=1e-12)
    assert stats[:, 1].tolist() == ref_correct and stats[:, 2].tolist() == ref_count
    if vocab == "reduced-none-in-vocab":  # nothing to learn and nothing right, but every position counted
        assert float(loss) == 0.0 and sum(ref_correct) == 0
        assert stats[:, 2].tolist() == step_weights(batch.loss_mask, steps, 0.8)[0].sum(dim=(1, 2)).tolist()
