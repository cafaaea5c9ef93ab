"""Caches written by an earlier release are still read: tests/fixtures/cache_v1 was written by release 95dabc5's
own shard writer (tests/fixtures/make_cache_v1.py says how); today's reader, verify and writer take it as it is."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from eaglecache.formats.cache import METADATA_KEYS, fingerprint, read_cache_json
from eaglecache.precompute.cache_tools import run_info, run_verify
from eaglecache.formats.cache_reader import open_cache
from eaglecache.precompute.writer import PartWriter

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_cache_v1", FIXTURES / "make_cache_v1.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)  # only its sample generator and constants: the writing needs the old release
EXPECTED = make.samples()
STORED = [sid for sid in range(make.NUM_SAMPLES) if sid not in make.SKIPPED]


def _bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


@pytest.mark.parametrize("name", list(make.CACHES))
def test_a_v1_cache_reads_the_samples_it_was_written_with(name):
    cache = open_cache(FIXTURES / "cache_v1" / name)
    codec, fp8 = make.CACHES[name]
    assert cache.metadata == make.metadata(codec, fp8) and set(cache.metadata) == set(METADATA_KEYS)
    assert list(cache.sample_ids) == STORED and cache.skipped == [
        {"sample_id": sid, "reason": reason} for sid, reason in make.SKIPPED.items()]
    assert len(cache.shard_paths) == 4  # two parts of two shards each
    for sid in STORED:
        sample, expected = cache.read(sid), EXPECTED[sid]
        assert cache.num_tokens(sid) == len(expected["input_ids"])
        assert np.array_equal(sample.input_ids, expected["input_ids"])
        assert np.array_equal(sample.loss_mask, expected["loss_mask"])
        for array in ("aux", "final"):
            got = getattr(sample, array)
            assert got.dtype == torch.bfloat16 and tuple(got.shape) == expected[array].shape
            if not fp8:  # bit for bit
                assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), expected[array])
                continue
            # e4m3 with one scale per row: 3 mantissa bits (relative 2^-4), subnormal steps of scale * 2^-9
            x = _bf16(expected[array]).float()
            scale = x.abs().amax(dim=-1, keepdim=True) / 448.0
            assert ((got.float() - x).abs() <= 0.07 * x.abs() + scale * 2 ** -9 + 1e-30).all()


@pytest.mark.parametrize("name", list(make.CACHES))
def test_a_v1_cache_verifies_and_its_parts_resume_as_complete(name, tmp_path, capsys):
    assert run_verify(FIXTURES / "cache_v1" / name) == 0
    assert run_info(FIXTURES / "cache_v1" / name) == 0
    assert "2 of 2 complete" in capsys.readouterr().out
    copy = tmp_path / name
    shutil.copytree(FIXTURES / "cache_v1" / name, copy)
    meta = read_cache_json(copy / "cache.json")["metadata"]
    for part_index in range(2):  # what a rerun of the old job array finds: nothing left to compute
        writer = PartWriter(copy, part_index, 2, meta)
        assert writer.complete and writer.record["cache_fingerprint"] == fingerprint(meta)
        assert writer.committed == {sid for sid in STORED if make.PART_RANGES[part_index][0] <= sid
                                    < make.PART_RANGES[part_index][1]}
