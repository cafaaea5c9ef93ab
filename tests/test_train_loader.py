"""The streaming loader: deterministic order, disjoint ranks, world-size independent micro-batches,
the TTT shift, exact resume, background reading equal to inline reading, Zarr cache == memory."""

import numpy as np
import pytest
import torch

from conftest import random_feature_samples, write_cache_parts
from eaglecache.errors import UserError
from eaglecache.formats.cache_reader import open_cache
from eaglecache.train.loader import InMemoryFeatures, SamplePlan, StreamingLoader

HIDDEN, NUM_AUX = 8, 3


def random_samples(num=24, seed=0, min_len=5, max_len=30):
    return random_feature_samples(num, hidden=HIDDEN, vocab=100, num_aux=NUM_AUX, seed=seed, min_len=min_len,
                                  max_len=max_len)


METADATA = {"aux_layer_ids": [2, 4, 5], "hidden_size": HIDDEN, "vocab_size": 100}


def write_cache(path, samples, num_parts=2):
    """A real Zarr cache (precompute's writer) holding ``samples``, split over parts and shards."""
    meta = dict(METADATA, dtype="bfloat16", codec="zstd", codec_level=1, chunk_tokens=16, shard_tokens=60,
                num_parts=num_parts)
    return open_cache(write_cache_parts(path, samples, meta))


def make_plan(source, world_size=1, global_batch=4, micro_batch=1, seed=3):
    lengths = [source.num_tokens(s) for s in source.sample_ids]
    return SamplePlan(source.sample_ids, lengths, seed=seed, global_batch_size=global_batch,
                      micro_batch_size=micro_batch, world_size=world_size)


def collect(loader):
    return [(step, [b.sample_ids for b in batches]) for step, batches in loader]


def test_order_depends_on_seed_and_epoch_only_and_covers_each_epoch_once():
    source = InMemoryFeatures(random_samples(), METADATA)
    plan = make_plan(source)
    again = make_plan(source)
    assert [plan.global_batch(s) for s in range(12)] == [again.global_batch(s) for s in range(12)]
    epoch0 = [sid for s in range(plan.steps_per_epoch) for mb in plan.global_batch(s) for sid in mb]
    epoch1 = [sid for s in range(plan.steps_per_epoch, 2 * plan.steps_per_epoch) for mb in plan.global_batch(s)
              for sid in mb]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1  # a new permutation each epoch
    assert [plan.global_batch(s) for s in range(3)] != [make_plan(source, seed=4).global_batch(s) for s in range(3)]


def test_ranks_read_disjoint_samples_and_two_ranks_see_what_one_rank_accumulates():
    source = InMemoryFeatures(random_samples(), METADATA)
    one = make_plan(source, world_size=1, global_batch=8, micro_batch=2)
    two = make_plan(source, world_size=2, global_batch=8, micro_batch=2)
    assert one.accumulation_steps == 4 and two.accumulation_steps == 2
    for step in range(5):
        r0, r1 = two.rank_micro_batches(step, 0), two.rank_micro_batches(step, 1)
        assert not set(sum(r0, [])) & set(sum(r1, []))
        # accumulation step i of rank r is micro-batch i * world + r of the world-independent list
        interleaved = [mb for pair in zip(r0, r1) for mb in pair]
        assert interleaved == one.rank_micro_batches(step, 0)


def test_micro_batches_are_bucketed_by_length():
    source = InMemoryFeatures(random_samples(num=32), METADATA)
    plan = make_plan(source, global_batch=16, micro_batch=4)
    for step in range(2):
        lengths = [[source.num_tokens(s) for s in mb] for mb in plan.global_batch(step)]
        flat = sum(lengths, [])
        assert flat == sorted(flat, reverse=True)


def test_batches_are_shifted_truncated_and_padded():
    samples = random_samples(num=8)
    source = InMemoryFeatures(samples, METADATA)
    plan = make_plan(source, global_batch=4, micro_batch=2)
    loader = StreamingLoader(source, plan, rank=0, max_seq_length=20, total_steps=1, workers=0)
    _, batches = next(iter(loader))
    batch = batches[0]
    length = batch.input_ids.shape[1]
    assert length <= 20
    for row, sid in enumerate(batch.sample_ids):
        s = samples[sid]
        n = min(len(s.input_ids), 20)
        assert torch.equal(batch.input_ids[row, :n - 1], torch.from_numpy(s.input_ids[1:n].astype(np.int64)))
        assert (batch.input_ids[row, n - 1:] == 0).all()
        assert torch.equal(batch.final[row, :n - 1], s.final[1:n]) and (batch.final[row, n - 1:] == 0).all()
        assert torch.equal(batch.aux[row, :n], s.aux[:n]) and (batch.aux[row, n:] == 0).all()
        assert torch.equal(batch.loss_mask[row, :n - 1], torch.from_numpy(s.loss_mask[:n - 1]))
        assert (batch.loss_mask[row, n - 1:] == 0).all()
    assert batch.num_tokens == sum(min(len(samples[s].input_ids), 20) for s in batch.sample_ids)


def test_background_threads_give_the_inline_batches_and_resume_is_exact():
    samples = random_samples()
    source = InMemoryFeatures(samples, METADATA)
    plan = make_plan(source, world_size=2, global_batch=4, micro_batch=1)
    inline = StreamingLoader(source, plan, rank=1, max_seq_length=64, total_steps=15, workers=0)
    threaded = StreamingLoader(source, plan, rank=1, max_seq_length=64, total_steps=15, workers=3, prefetch=2)
    expected = collect(inline)
    assert collect(threaded) == expected and len(expected) == 15
    # stop after 6 steps, resume a fresh loader from the saved position
    partial = StreamingLoader(source, plan, rank=1, max_seq_length=64, total_steps=15, workers=2)
    seen = []
    for step, batches in partial:
        seen.append((step, [b.sample_ids for b in batches]))
        if step == 5:
            break
    state = partial.state_dict()
    resumed = StreamingLoader(source, plan, rank=1, max_seq_length=64, total_steps=15, workers=2)
    resumed.load_state_dict(state)
    assert seen + collect(resumed) == expected
    other_plan = make_plan(source, world_size=2, global_batch=4, seed=9)
    with pytest.raises(UserError, match="seed"):
        StreamingLoader(source, other_plan, rank=1, max_seq_length=64, total_steps=15).load_state_dict(state)


def test_zarr_cache_and_memory_give_identical_batches(tmp_path):
    samples = random_samples()
    cache = write_cache(tmp_path / "cache", samples)
    memory = InMemoryFeatures(samples, METADATA)
    assert list(cache.sample_ids) == list(memory.sample_ids)
    kwargs = dict(rank=0, max_seq_length=25, total_steps=6, aux_indices=[0, 2])
    from_cache = StreamingLoader(cache, make_plan(cache, global_batch=4, micro_batch=2), workers=2, **kwargs)
    from_memory = StreamingLoader(memory, make_plan(memory, global_batch=4, micro_batch=2), workers=0, **kwargs)
    for (s1, b1), (s2, b2) in zip(from_cache, from_memory, strict=True):
        assert s1 == s2
        for x, y in zip(b1, b2):
            assert x.sample_ids == y.sample_ids and x.aux.shape[2] == 2
            for a, b in zip(x.model_inputs(), y.model_inputs()):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_too_few_samples_or_an_uneven_batch_is_a_user_error():
    source = InMemoryFeatures(random_samples(num=3), METADATA)
    with pytest.raises(UserError, match="fewer than one global batch"):
        make_plan(source, global_batch=4)
    with pytest.raises(UserError, match="not a multiple"):
        make_plan(source, global_batch=3, micro_batch=2)


def _batch_hashes(loader) -> list[tuple[int, str]]:
    import hashlib

    hashes = []
    for step, batches in loader:
        digest = hashlib.sha256()
        for batch in batches:
            for tensor in batch.model_inputs():
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        hashes.append((step, digest.hexdigest()))
    return hashes


def test_cache_batches_are_identical_for_any_worker_count_and_across_a_resume(tmp_path):
    samples = random_samples(num=40, min_len=1, max_len=70)  # samples over several chunks, and 1-token ones
    cache = write_cache(tmp_path / "cache", samples)
    plan = make_plan(cache, world_size=2, global_batch=8, micro_batch=2)
    loader = lambda workers: StreamingLoader(cache, plan, rank=1, max_seq_length=48, total_steps=10,  # noqa: E731
                                             workers=workers, prefetch=2)
    expected = _batch_hashes(loader(1))
    assert _batch_hashes(loader(4)) == expected and len(expected) == 10
    memory = InMemoryFeatures(samples, METADATA)  # the generic path (``read``): the decode-in-place path equals it
    assert _batch_hashes(StreamingLoader(memory, plan, rank=1, max_seq_length=48, total_steps=10, workers=0)) == expected
    partial = loader(4)
    seen = []
    for step, batches in partial:
        seen.append(step)
        if step == 3:
            break
    resumed = loader(4)
    resumed.load_state_dict(partial.state_dict())
    assert expected[:4] + _batch_hashes(resumed) == expected


class HintedSource:
    """What ReadAhead uses of a cache: tokens per sample, the layout's bytes, prefetch (recorded)."""

    metadata = {"aux_layer_ids": [1, 2, 3], "hidden_size": 8, "dtype": "bfloat16"}
    hinted: list = []

    def num_tokens(self, sid):
        return 10

    def prefetch(self, ids):
        HintedSource.hinted.extend(ids)


def test_read_ahead_hints_the_micro_batches_after_the_one_started_up_to_its_byte_window():
    from eaglecache.train.readahead import ReadAhead

    HintedSource.hinted = []
    per_sample = 10 * (5 + 2 * 4 * 8)  # tokens x (id + mask + 4 bf16 states of 8)
    readahead = ReadAhead(HintedSource(), window_bytes=3 * per_sample)
    indices = [readahead.queued([sid]) for sid in range(8)]
    readahead.started(indices[0])
    assert HintedSource.hinted == [1, 2, 3]  # three samples' bytes ahead of the decoder, not the one it reads
    readahead.started(indices[1])
    assert HintedSource.hinted == [1, 2, 3, 4]  # the window moved by one: one more hint, none twice
    readahead.started(indices[6])  # a worker far ahead: what it skipped is never hinted late
    assert HintedSource.hinted == [1, 2, 3, 4, 7]
