"""Precompute through vLLM on the tiny target: stored states are transformers' hidden states, token ids
and masks are the prepared data's, and a job array's parts read as exactly what one job writes."""

import numpy as np
import pytest
import torch

from conftest import PRECOMPUTE_ENGINE_OVERRIDES
from eaglecache.config import load_config
from eaglecache.dtypes import TORCH_DTYPES
from eaglecache.data.writer import write_dataset
from eaglecache.formats.dataset import open_dataset
from eaglecache.formats.cache_reader import open_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_target, precompute_engine, tmp_path_factory):
    from eaglecache.target import chat_template_hash, target_config, tokenizer_hash

    config = load_config(None, [f"target.path={tiny_target}", *PRECOMPUTE_ENGINE_OVERRIDES,
                                "precompute.shard_tokens=1500", "precompute.chunk_tokens=64"])
    vocab = target_config(tiny_target)["vocab_size"]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        t = int(rng.integers(2, 400))
        mask = (rng.random(t) < 0.5).astype(np.uint8)
        rows.append({"input_ids": rng.integers(0, vocab, t).astype(np.int32), "loss_mask": mask,
                     "source": "synthetic", "record_index": i, "content_hash": f"synthetic-{i}"})
    data = tmp_path_factory.mktemp("data") / "prepared"
    write_dataset(data, rows, {"target_path": str(tiny_target), "tokenizer_hash": tokenizer_hash(tiny_target),
                               "chat_template_hash": chat_template_hash(tiny_target), "config": {}})
    return config, data, precompute_engine, tmp_path_factory.mktemp("caches")


@pytest.fixture(scope="module")
def one_job(setup):
    from eaglecache.precompute.run import run_precompute

    config, data, llm, caches = setup
    assert run_precompute(config, data=data, output=caches / "one", llm=llm) == 0
    return open_cache(caches / "one")


def test_stored_states_are_transformers_hidden_states(setup, one_job, tiny_target):
    from transformers import AutoModelForCausalLM

    dataset = open_dataset(setup[1])
    cache = one_job
    meta = cache.metadata
    assert list(cache.sample_ids) == list(range(len(dataset)))
    assert meta["final_layer_id"] == meta["num_hidden_layers"] and meta["final_prenorm"] is True
    assert len(meta["aux_layer_ids"]) == 3 and meta["tensor_parallel_size"] == 1
    # the target computes in the machine's dtype (bf16 only where native); transformers does the same here
    compute_dtype = setup[0].target.compute_dtype()
    assert meta["compute_dtype"] == compute_dtype and meta["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=TORCH_DTYPES[compute_dtype]).eval()
    for sample_id in cache.sample_ids:
        stored, prepared = cache.read(sample_id), dataset.sample(int(sample_id))
        assert np.array_equal(stored.input_ids, prepared["input_ids"])
        assert np.array_equal(stored.loss_mask, prepared["loss_mask"])
        with torch.no_grad():
            out = model(torch.from_numpy(stored.input_ids.astype(np.int64))[None], output_hidden_states=True)
            after_norm = model.model.norm(stored.final[None])[0]
        pairs = [(stored.aux[:, j], out.hidden_states[k][0]) for j, k in enumerate(meta["aux_layer_ids"])]
        pairs.append((after_norm, out.hidden_states[-1][0]))  # HF's last entry is post-norm
        for got, ref in pairs:
            got, ref = got.float(), ref.float()
            # stored bf16 keeps 8 mantissa bits; vLLM's and transformers' kernels round differently
            assert (got - ref).norm() <= 0.02 * ref.norm(), f"sample {sample_id}"
            assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-2, f"sample {sample_id}"


def test_two_jobs_read_as_one_equal_one_job(setup, one_job):
    from eaglecache.precompute.run import run_precompute

    config, data, llm, caches = setup
    for index in (1, 0):  # order does not matter
        assert run_precompute(config, data=data, output=caches / "two", part_index=index, num_parts=2, llm=llm) == 0
    two = open_cache(caches / "two")
    assert len(two.parts) == 2 and all(len(record["shards"]) for _, record in two.parts)
    assert np.array_equal(two.sample_ids, one_job.sample_ids)
    for sample_id in one_job.sample_ids:
        a, b = one_job.read(sample_id), two.read(sample_id)
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        assert torch.equal(a.aux.view(torch.int16), b.aux.view(torch.int16)), f"sample {sample_id}"
        assert torch.equal(a.final.view(torch.int16), b.final.view(torch.int16)), f"sample {sample_id}"


def test_the_recorded_metadata_has_exactly_the_format_keys(one_job):
    from eaglecache.formats.cache import METADATA_KEYS

    assert sorted(one_job.metadata) == sorted(METADATA_KEYS)
