"""The loss knobs of train.*: lk_loss / lk_eta, hidden_noise, loss_mask_alignment (docs/loss.md).

Each is checked against something written independently of train/: the LK losses against values
worked out by hand and against autograd through the plain formulas, the noise against its stated
distribution, the mask alignment against a hand-made mask; and each enters a run's fingerprint only
when set off its default.
"""

import math

import pytest
import torch

from eaglecache.config import load_config
from eaglecache.train.loss import _ChunkedSoftCE
from eaglecache.train.ttt import TTTSettings, noisy_aux, shift_left, step_weights
from test_ttt_loss import make_batch, make_draft, run_implementation

KNOBS = ("lk_loss", "lk_eta", "hidden_noise", "loss_mask_alignment")


def _one_position(lk_loss, eta=3.0):
    """LM-head loss of one position with identity heads, so the logits are the hidden state itself: the
    teacher p = (0.5, 0.25, 0.25), the draft q = (0.2, 0.3, 0.5). Returns (loss, d loss / d logits)."""
    eye = torch.eye(3, dtype=torch.float64)
    draft_logits = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64).log().view(1, 1, 1, 3).requires_grad_(True)
    teacher = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log().view(1, 1, 3)
    masks = torch.ones(1, 1, 1, dtype=torch.bool)
    weights = torch.ones(1, 1, 1, dtype=torch.float64)
    loss, _, _ = _ChunkedSoftCE.apply(draft_logits, eye, teacher, eye, masks, weights, None, None, 16, lk_loss, eta)
    (grad,) = torch.autograd.grad(loss, draft_logits)
    return float(loss.detach()), grad.flatten().tolist()


def test_lk_losses_equal_their_hand_computed_values_on_one_position():
    # acceptance alpha = sum min(p, q) = 0.2 + 0.25 + 0.25 = 0.7; only token 0 has q < p, so
    # d alpha / d z = q * ([1, 0, 0] - 0.2) = (0.16, -0.06, -0.10)
    loss, grad = _one_position("alpha")
    assert loss == pytest.approx(0.35667494393873245, abs=1e-12)  # -ln 0.7
    assert grad == pytest.approx([-0.16 / 0.7, 0.06 / 0.7, 0.10 / 0.7], abs=1e-12)
    # lambda: w = exp(-3 * 0.7) = 0.1224564; KL(p || q) = 0.5 ln 2.5 + 0.25 ln(5/6) + 0.25 ln 0.5 = 0.2392782;
    # loss = w * KL + (1 - w) * (1 - 0.7); gradient w * (q - p) - (1 - w) * d alpha / d z, w held fixed
    loss, grad = _one_position("lambda")
    assert loss == pytest.approx(0.2925642230015387, abs=1e-12)
    assert grad == pytest.approx([-0.1771438999554175, 0.058775435717470174, 0.11836846423794731], abs=1e-12)
    # eta 0: all KL (the soft cross-entropy's gradient, q - p); the default stays the soft cross-entropy
    loss, grad = _one_position("lambda", eta=0.0)
    assert loss == pytest.approx(0.23927818159860256, abs=1e-12) and grad == pytest.approx([-0.3, 0.05, 0.25])
    loss, grad = _one_position(None)
    assert loss == pytest.approx(1.2789989524385206, abs=1e-12) and grad == pytest.approx([-0.3, 0.05, 0.25])


def _lk_reference(draft, raw, steps, decay, lk_loss, eta):
    """The LK loss through the draft's own unroll (checked against the plain reference in test_ttt_loss) with
    full logits and torch autograd: a check of train/loss.py's chunked loss and hand-written gradient."""
    from eaglecache.train.loader import shift_sample_tensors
    from eaglecache.train.ttt import unroll

    ids, mask, aux, final = shift_sample_tensors(*raw)
    settings = TTTSettings(ttt_length=steps, ttt_decay=decay)
    normed = unroll(draft, ids, aux, settings)
    head = draft.lm_head
    weight = draft.target.lm_head_weight if head.weight is None else head.weight
    masks, weights = step_weights(mask, steps, decay)
    total = 0.0
    length = ids.shape[1]
    for k in range(steps):
        n = length - k
        target_logits = draft.target.final_norm(final)[:, k:k + n] @ draft.target.lm_head_weight.T
        if head.draft_ids is None:
            p = accepted = target_logits.softmax(-1)
            w = weights[k, :, :n]
        else:  # renormalized over the draft's vocab for KL; the target's own probabilities for alpha
            accepted = target_logits.softmax(-1)[..., head.draft_ids]
            p = target_logits[..., head.draft_ids].softmax(-1)
            w = weights[k, :, :n] * head.t2d[target_logits.argmax(-1)]
        logits = normed[k][:, :n] @ weight.T
        q = logits.softmax(-1)
        alpha = torch.minimum(q, accepted).sum(-1)
        if lk_loss == "alpha":
            per_position = -alpha.clamp_min(1e-5).log()
        else:
            kl_weight = torch.exp(-eta * alpha.detach())
            kl = (p * (p.log() - logits.log_softmax(-1))).sum(-1)
            per_position = kl_weight * kl + (1 - kl_weight) * (1 - alpha)
        total = total + (per_position * w).sum()
    return total


@pytest.mark.parametrize("lk_loss", ["alpha", "lambda"])
@pytest.mark.parametrize("draft_vocab", [None, 20], ids=["full-vocab", "reduced-vocab"])
def test_lk_loss_and_gradients_equal_autograd_through_the_plain_formulas(lk_loss, draft_vocab):
    steps, decay, eta = 4, 0.8, 2.0
    draft = make_draft(draft_vocab)
    raw = make_batch(length=11)
    params = list(draft.parameters())
    ref = _lk_reference(draft, raw, steps, decay, lk_loss, eta)
    ref_grads = torch.autograd.grad(ref, params)
    draft.settings = TTTSettings(ttt_length=steps, ttt_decay=decay, loss_chunk_tokens=5, attention="split",
                                 lk_loss=lk_loss, lk_eta=eta)
    from eaglecache.train.loader import shift_sample_tensors

    loss, stats = draft(*shift_sample_tensors(*raw))
    grads = torch.autograd.grad(loss, params)
    assert torch.allclose(loss, ref, rtol=1e-10), (loss, ref)
    for (name, _), g, rg in zip(draft.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-8, atol=1e-11), (name, (g - rg).abs().max())
    # the logged per-step cross-entropy and accuracy do not depend on the loss
    _, ce_stats = run_implementation(draft, raw, steps, decay, attention="split", chunk=5)
    assert torch.allclose(stats, ce_stats, rtol=1e-12)
    assert not torch.allclose(loss, run_implementation(draft, raw, steps, decay, attention="split", chunk=5)[0])


def test_hidden_noise_is_uniform_with_the_stated_half_width_in_training_only():
    half = 0.5
    settings = TTTSettings(hidden_noise=half)
    aux = torch.full((8, 512, 3, 32), 3.0, dtype=torch.bfloat16)
    torch.manual_seed(0)
    noisy = noisy_aux(aux, settings, training=True, dtype=torch.bfloat16)
    noise = noisy - 3.0
    assert noisy.dtype == torch.float32  # added in fp32, not in the cache's bf16
    assert noise.abs().max() <= half and noise.abs().max() > 0.999 * half  # U(-x, x): x is the half-width
    assert abs(float(noise.mean())) < 0.005 and float(noise.std()) == pytest.approx(half / math.sqrt(3), rel=0.01)
    assert noisy_aux(aux, settings, training=False, dtype=torch.float32) is aux  # evaluation: untouched
    assert noisy_aux(aux, TTTSettings(), training=True, dtype=torch.float32) is aux  # 0: none

    # through the draft: only the aux states are perturbed (never the teacher), by at most x, in training only
    draft = make_draft()
    raw = make_batch()
    seen = {}
    combine, final_norm = draft.combine, draft.target.final_norm
    draft.combine = lambda x: (seen.__setitem__("aux", x.detach().clone()), combine(x))[1]
    draft.target.final_norm = lambda x: (seen.__setitem__("final", x.clone()), final_norm(x))[1]
    from eaglecache.train.loader import shift_sample_tensors

    batch = shift_sample_tensors(*raw)
    draft.settings = TTTSettings(ttt_length=3, hidden_noise=half)
    draft.train()
    noisy_loss, _ = draft(*batch)
    assert 0 < (seen["aux"] - batch[2].flatten(2)).abs().max() <= half
    assert torch.equal(seen["final"], batch[3])
    draft.eval()
    eval_loss, _ = draft(*batch)
    assert torch.equal(seen["aux"], batch[2].flatten(2))
    draft.settings = TTTSettings(ttt_length=3)
    clean_loss, _ = draft(*batch)
    assert torch.equal(eval_loss, clean_loss) and not torch.allclose(noisy_loss, clean_loss)


def test_predicted_alignment_weights_each_step_by_the_mask_of_the_token_it_predicts():
    # loader-shifted mask of one sample: a prompt (0), an answer (1), the next prompt, an answer; last zeroed
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.uint8)
    anchor, _ = step_weights(mask, 2, 0.8, "anchor")
    predicted, weights = step_weights(mask, 2, 0.8, "predicted")
    # step k at t predicts raw token t + k + 2: anchor reads mask[t + k], predicted mask[t + k + 2]
    assert anchor.int().tolist() == [[[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]], [[0, 1, 1, 1, 0, 0, 1, 1, 0, 0]]]
    assert predicted.int().tolist() == [[[1, 1, 1, 0, 0, 1, 1, 0, 0, 0]], [[1, 1, 0, 0, 1, 1, 0, 0, 0, 0]]]
    # so the first two answer tokens of a turn count (predicted from the prompt) and the two tokens after a
    # turn ends do not; each step is still averaged over its own counted positions
    assert weights[0].sum().item() == pytest.approx(1.0) and weights[1].sum().item() == pytest.approx(0.8)

    # end to end: the predicted alignment is the anchor one over the mask shifted left by two
    steps, decay = 3, 0.8
    draft = make_draft()
    ids, raw_mask, aux, final = make_batch(length=10)
    raw_mask[:, -1] = 0  # the loader zeroes the last mask position, which the shifted mask would not
    shifted = shift_left(raw_mask, 2)
    draft.settings = TTTSettings(ttt_length=steps, ttt_decay=decay, loss_chunk_tokens=4,
                                 loss_mask_alignment="predicted")
    from eaglecache.train.loader import shift_sample_tensors

    loss, stats = draft(*shift_sample_tensors(ids, raw_mask, aux, final))
    ref_loss, ref_stats = run_implementation(draft, (ids, shifted, aux, final), steps, decay, chunk=4)
    assert torch.allclose(loss, ref_loss, rtol=1e-12) and torch.equal(stats[:, 1:5], ref_stats[:, 1:5])
    # the decode walk (the simulated accept length) reads the mask itself, whatever the loss weights
    _, anchor_stats = run_implementation(draft, (ids, raw_mask, aux, final), steps, decay, chunk=4)
    assert torch.equal(stats[:, 5:], anchor_stats[:, 5:])
    assert not torch.allclose(loss, run_implementation(draft, (ids, raw_mask, aux, final), steps, decay, chunk=4)[0])


def test_each_knob_enters_the_fingerprint_only_when_set_off_what_earlier_releases_did():
    """Runs made before the knobs keep their fingerprints (they trained with no LK loss, no noise and the anchor
    alignment); today's default alignment (predicted) and every other setting get fingerprints of their own."""
    from eaglecache.train.checkpoint import run_fingerprint

    before = load_config(None, ["train.loss_mask_alignment=anchor"])
    assert not set(KNOBS) & set(before.train.identity())
    explicit = load_config(None, ["train.lk_loss=null", "train.lk_eta=3.0", "train.hidden_noise=0.0",
                                  "train.loss_mask_alignment=anchor"])
    assert run_fingerprint(explicit) == run_fingerprint(before)
    default = load_config(None)
    assert default.train.loss_mask_alignment == "predicted"
    assert default.train.identity()["loss_mask_alignment"] == "predicted"
    changed = {run_fingerprint(load_config(None, ["train.loss_mask_alignment=anchor", override])) for override in (
        "train.lk_loss=alpha", "train.lk_loss=lambda", "train.lk_eta=2.0", "train.hidden_noise=0.05",
        "train.loss_mask_alignment=predicted")}
    assert len(changed) == 5 and run_fingerprint(before) not in changed
    assert run_fingerprint(default) in changed
    settings = TTTSettings.from_config(load_config(None, [
        "train.lk_loss=lambda", "train.lk_eta=2.5", "train.hidden_noise=0.1",
        "train.loss_mask_alignment=predicted"]).train, torch.device("cpu"))
    assert (settings.lk_loss, settings.lk_eta, settings.hidden_noise, settings.loss_mask_alignment) == (
        "lambda", 2.5, 0.1, "predicted")


def test_a_run_of_an_earlier_release_reads_as_the_anchor_alignment_it_trained_with(tmp_path):
    """Its config.yaml has no loss_mask_alignment: in a run directory (run.json beside it) that means anchor,
    so its fingerprint is unchanged and a resume continues it as it was trained; elsewhere, today's default."""
    import yaml

    from eaglecache.train.checkpoint import run_fingerprint

    tree = load_config(None, ["train.loss_mask_alignment=anchor"]).to_dict()
    del tree["train"]["loss_mask_alignment"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    assert load_config(run / "config.yaml").train.loss_mask_alignment == "predicted"  # not a run yet
    (run / "run.json").write_text("{}")
    old = load_config(run / "config.yaml")
    assert old.train.loss_mask_alignment == "anchor"
    assert run_fingerprint(old) == run_fingerprint(load_config(None, ["train.loss_mask_alignment=anchor"]))


def test_dflash_takes_the_same_knobs():
    """DFlash's loss goes through the same step weights, LM-head loss and aux noise: with the mask shifted by
    two, the predicted alignment is the anchor one; an LK loss changes the loss, not the logged statistics;
    the noise acts in training only."""
    import test_dflash
    from eaglecache.train.loader import shift_sample_tensors

    draft = test_dflash.make_draft(num_layers=1)
    ids, mask, aux, final = test_dflash.make_batch(length=10)
    mask[:, -1] = 0

    def run(raw, **knobs):
        draft.settings = TTTSettings(ttt_length=3, ttt_decay=0.8, loss_chunk_tokens=4, **knobs)
        with torch.no_grad():
            return draft(*shift_sample_tensors(*raw))

    plain_loss, plain_stats = run((ids, mask, aux, final))
    loss, stats = run((ids, mask, aux, final), loss_mask_alignment="predicted")
    ref_loss, ref_stats = run((ids, shift_left(mask, 2), aux, final))
    assert torch.allclose(loss, ref_loss, rtol=1e-12) and torch.equal(stats[:, 1:5], ref_stats[:, 1:5])
    lk_loss, lk_stats = run((ids, mask, aux, final), lk_loss="alpha")
    assert not torch.allclose(lk_loss, plain_loss) and torch.allclose(lk_stats, plain_stats, rtol=1e-12)
    draft.eval()
    assert torch.equal(run((ids, mask, aux, final), hidden_noise=0.5)[0], plain_loss)
    draft.train()
    assert not torch.allclose(run((ids, mask, aux, final), hidden_noise=0.5)[0], plain_loss)
