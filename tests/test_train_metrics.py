"""The training-time simulation of vLLM's accept length walks the tokens the way the decoder does."""

import torch

from eaglecache.train.metrics import decode_walk


def turn_mask(length, *turns):
    mask = torch.zeros(1, length, dtype=torch.uint8)
    for first, last in turns:
        mask[0, first:last + 1] = 1
    return mask


def accept_length(agree, mask, depth):
    accepted, rounds = decode_walk(agree, mask)[depth - 1].tolist()
    return 1 + accepted / rounds, int(rounds)


def test_a_perfect_draft_accepts_every_draft_token_inside_the_turn():
    mask = turn_mask(12, (2, 9))  # the target generates tokens 2..9; the prefill gives token 2
    agree = torch.ones(3, 1, 12, dtype=torch.bool)
    # rounds after tokens 2 and 6: each accepts 3 (3-5, then 7-9, the end of the turn)
    assert accept_length(agree, mask, 3) == (4.0, 2)
    # with one draft token: rounds after tokens 2, 4, 6, 8 accept one each
    assert accept_length(agree, mask, 1) == (2.0, 4)


def test_a_useless_draft_takes_one_round_per_generated_token():
    mask = turn_mask(12, (2, 9))
    agree = torch.zeros(3, 1, 12, dtype=torch.bool)
    assert accept_length(agree, mask, 3) == (1.0, 7)  # after tokens 2..8


def test_easy_stretches_are_skipped_and_hard_ones_visited_at_every_token():
    mask = turn_mask(16, (2, 13))
    agree = torch.zeros(3, 1, 16, dtype=torch.bool)
    agree[:, 0, 1:5] = True  # the draft is right after tokens 2..5 (t = 1..4), wrong after the others
    # rounds at t = 1 (accepts 3), then t = 5..11 one by one (accept nothing)
    assert accept_length(agree, mask, 3) == (1 + 3 / 8, 8)
    # the per-position average would be much higher: 4 of 11 positions accept 3
    per_position = 1 + (agree[:, 0, 1:12].all(0).sum().item() * 3) / 11
    assert per_position > accept_length(agree, mask, 3)[0] + 0.3


def test_a_new_turn_starts_a_new_walk_and_a_draft_never_accepts_past_the_turn():
    mask = turn_mask(20, (2, 6), (11, 15))
    agree = torch.ones(3, 1, 20, dtype=torch.bool)
    # turn 1 (tokens 2..6): the round after token 2 accepts 3, 4, 5 and the target adds 6, its
    # last token, so no round follows; turn 2 (11..15): the round after 11 accepts 12, 13, 14
    assert decode_walk(agree, mask)[2].tolist() == [6, 2]


def test_a_micro_batch_no_longer_than_the_ttt_depth_is_walked():
    """T <= K (a short sample alone in its micro-batch): the walk sees at most T - 2 draft tokens."""
    steps = 7
    for length, depth, expected in ((7, 3, [4, 2]), (7, 7, [5, 1]), (6, 7, [4, 1]), (3, 7, [1, 1]),
                                    (2, 7, [0, 0]), (1, 7, [0, 0])):
        mask = turn_mask(length, (0, length - 1))
        agree = torch.ones(steps, 1, length, dtype=torch.bool)
        # tokens 0..L-1 generated: the round after token 1 (t = 0) drafts L - 2 of them at most
        assert decode_walk(agree, mask)[depth - 1].tolist() == expected, (length, depth)


def test_the_ttt_loss_of_a_batch_shorter_than_the_ttt_depth_equals_the_plain_reference():
    from test_ttt_loss import make_batch, make_draft, reference_loss, run_implementation

    steps, decay = 7, 0.8
    draft = make_draft()
    for length in (1, 3, 7):
        raw = make_batch(batch=2, length=length, seed=length)
        loss, stats = run_implementation(draft, raw, steps, decay, attention="split")
        ref_loss, ref_correct, ref_count = reference_loss(draft, *raw, steps, decay)
        assert torch.allclose(loss, torch.as_tensor(ref_loss, dtype=loss.dtype), rtol=1e-10, atol=1e-12), length
        assert stats[:, 1].tolist() == ref_correct and stats[:, 2].tolist() == ref_count
