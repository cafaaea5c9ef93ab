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


def _bits(sample) -> list[np.ndarray]:
    return [sample.input_ids, sample.loss_mask, sample.aux.view(torch.int16).numpy(), sample.final.view(torch.int16).numpy()]


@pytest.mark.parametrize("name", ["none", "zstd"])
def test_the_loader_reads_a_v1_cache_as_its_samples_read(name):
    from eaglecache.train.loader import InMemoryFeatures, SamplePlan, StreamingLoader

    cache = open_cache(FIXTURES / "cache_v1" / name)
    memory = InMemoryFeatures([cache.read(sid) for sid in cache.sample_ids.tolist()], cache.metadata)
    plan = SamplePlan(cache.sample_ids, cache.num_tokens_array(), seed=1, global_batch_size=4, micro_batch_size=2,
                      world_size=1)
    kwargs = dict(rank=0, max_seq_length=20, total_steps=plan.steps_per_epoch)
    for (_, ours), (_, theirs) in zip(StreamingLoader(cache, plan, workers=2, **kwargs),
                                      StreamingLoader(memory, plan, workers=0, **kwargs), strict=True):
        for x, y in zip(ours, theirs):
            for a, b in zip(x.model_inputs(), y.model_inputs()):
                assert torch.equal(a.view(torch.int16) if a.is_floating_point() else a,
                                   b.view(torch.int16) if b.is_floating_point() else b)


@pytest.mark.parametrize("codec", ["zstd", "none", "blosc-zstd"])
def test_convert_rewrites_a_v1_cache_in_format_v2_with_the_same_bits(tmp_path, codec, capsys):
    from eaglecache.config import load_config
    from eaglecache.precompute.convert import run_convert

    source = open_cache(FIXTURES / "cache_v1" / "zstd")
    config = load_config(None, [f"precompute.codec={codec}", "precompute.chunk_tokens=8"])
    assert run_convert(config, str(FIXTURES / "cache_v1" / "zstd"), str(tmp_path / "v2")) == 0
    converted = open_cache(tmp_path / "v2")
    assert converted.version == 2 and converted.metadata["codec"] == codec and converted.chunk_rows == (
        None if codec == "none" else 8)
    assert {k: v for k, v in converted.metadata.items() if k not in ("codec", "chunk_tokens", "config")} == {
        k: v for k, v in source.metadata.items() if k not in ("codec", "chunk_tokens", "config")}
    assert list(converted.sample_ids) == STORED and converted.skipped == source.skipped
    assert [r["sample_range"] for _, r in converted.parts] == [r["sample_range"] for _, r in source.parts]
    for sid in STORED:
        for a, b in zip(_bits(converted.read(sid)), _bits(source.read(sid))):
            assert np.array_equal(a, b)
    assert run_verify(tmp_path / "v2") == 0 and not (tmp_path / "v2.converting").exists()
    if codec != "none":  # v2: each sample starts a chunk
        shard = converted.parts[0][1]["shards"][0]
        offsets = __import__("zarr").open_array(converted.shard_paths[0] / "offsets", mode="r")[...]
        assert (offsets[:-1] % 8 == 0).all() and len(offsets) == shard["num_samples"] + 1


def test_convert_refuses_an_fp8_cache_and_an_existing_output(tmp_path, capsys):
    from eaglecache.cli import main

    assert main(["cache", "convert", "--cache", str(FIXTURES / "cache_v1" / "zstd-fp8"),
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FP8" in err[0] and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["cache", "convert", "--cache", str(FIXTURES / "cache_v1" / "zstd"),
                 "--output", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "taken" / "file").read_text() == "x"
