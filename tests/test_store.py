"""The feature cache format: bit-exact round trips, parts read as one cache, atomic commits, clear refusals."""

import json
import pickle

import numpy as np
import pytest
import torch
import zarr

from eaglecache.errors import UserError
from eaglecache.formats.bits import checksum
from eaglecache.formats.cache_reader import open_cache
from eaglecache.formats.cache import CACHE_FILE
from eaglecache.precompute.writer import PartWriter, create_or_check_cache, write_json_atomic

A, H = 3, 32


def _metadata(**overrides):
    meta = {"aux_layer_ids": [1, 2, 3], "final_layer_id": 4, "hidden_size": H, "dtype": "bfloat16",
            "codec": "zstd", "codec_level": 1, "chunk_tokens": 16, "shard_tokens": 100, "num_parts": 1}
    meta.update(overrides)
    return meta


def _samples(num_samples, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sid in range(num_samples):
        t = int(torch.randint(1, 70, (1,), generator=gen))
        out[sid] = dict(
            input_ids=torch.randint(0, 200064, (t,), generator=gen).numpy().astype(np.int32),
            loss_mask=torch.randint(0, 2, (t,), generator=gen).numpy().astype(np.uint8),
            # random bits cover every bf16 pattern: NaN payloads, denormals, -0
            aux=torch.randint(-2**15, 2**15, (t, A, H), dtype=torch.int16, generator=gen).view(torch.bfloat16),
            final=(torch.randn(t, H, generator=gen) * 30).to(torch.bfloat16),
        )
    return out


def _write(cache_dir, samples, meta, part_index=0, num_parts=1):
    create_or_check_cache(cache_dir, meta)
    writer = PartWriter(cache_dir, part_index, num_parts, meta)
    for sid, s in samples.items():
        writer.add(sid, **s)
    return writer.close()


def _assert_same(sample, expected):
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.uint8
    assert np.array_equal(sample.input_ids, expected["input_ids"])
    assert np.array_equal(sample.loss_mask, expected["loss_mask"])
    assert sample.aux.dtype == torch.bfloat16 and sample.final.dtype == torch.bfloat16
    assert torch.equal(sample.aux.view(torch.int16), expected["aux"].view(torch.int16))
    assert torch.equal(sample.final.view(torch.int16), expected["final"].view(torch.int16))


@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-zstd"])
def test_round_trip_is_bit_exact_for_every_codec(tmp_path, codec):
    samples = _samples(12)
    record = _write(tmp_path, samples, _metadata(codec=codec))
    assert len(record["shards"]) > 1, "shard_tokens=100 must split 12 samples into several shards"
    assert all(s["num_tokens"] <= 100 or s["num_samples"] == 1 for s in record["shards"])
    cache = open_cache(tmp_path)
    assert list(cache.sample_ids) == list(range(12))
    for sid, expected in samples.items():
        assert cache.num_tokens(sid) == len(expected["input_ids"])
        _assert_same(cache.read(sid), expected)
    cache = pickle.loads(pickle.dumps(cache))  # what a data-loader worker gets
    _assert_same(cache.read(5), samples[5])


@pytest.mark.parametrize("fp8", [False, True])
def test_recorded_checksums_are_those_of_the_stored_arrays(tmp_path, fp8):
    record = _write(tmp_path, _samples(12), _metadata(codec="none", dtype="fp8_e4m3" if fp8 else "bfloat16"))
    shard_dir = tmp_path / "parts" / "part-00000-of-00001"
    for shard in record["shards"]:
        group = zarr.open_group(shard_dir / shard["name"], mode="r")
        assert set(shard["checksums"]) == set(group.array_keys())
        for name, recorded in shard["checksums"].items():
            assert recorded == checksum(group[name][...]), (shard["name"], name)


def test_parts_written_by_independent_jobs_read_as_one_cache(tmp_path):
    samples = _samples(10, seed=1)
    meta = _metadata(num_parts=2)
    _write(tmp_path, {k: v for k, v in samples.items() if k % 2 == 1}, meta, part_index=1, num_parts=2)
    with pytest.raises(UserError, match=r"incomplete cache, parts \[0\]"):
        open_cache(tmp_path)
    assert list(open_cache(tmp_path, allow_partial=True).sample_ids) == [1, 3, 5, 7, 9]
    _write(tmp_path, {k: v for k, v in samples.items() if k % 2 == 0}, meta, part_index=0, num_parts=2)
    cache = open_cache(tmp_path)
    assert list(cache.sample_ids) == list(range(10))
    for sid, expected in samples.items():
        _assert_same(cache.read(sid), expected)


def test_reading_a_sample_touches_only_its_chunks(tmp_path):
    import zarr
    from zarr.storage import LocalStore

    samples = _samples(12, seed=2)
    _write(tmp_path, samples, _metadata(shard_tokens=10_000, chunk_tokens=8, codec="none"))
    cache = open_cache(tmp_path)
    sid = 6
    start = int(cache._start[cache._find(sid)])
    stop = start + cache.num_tokens(sid)
    spanned = (stop - 1) // 8 - start // 8 + 1
    chunk_bytes = 8 * A * H * 2
    shard_file = cache.shard_paths[0] / "aux" / "c.0.0.0"
    assert shard_file.stat().st_size > 4 * spanned * chunk_bytes, "the shard must be much larger than one sample"

    read_bytes = []

    class CountingStore(LocalStore):
        async def get(self, key, prototype, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if key.startswith("aux/c") and buf is not None:
                read_bytes.append(len(buf))
            return buf

    store = CountingStore(cache.shard_paths[0], read_only=True)
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}):
        arr = zarr.open_group(store, mode="r", use_consolidated=True)["aux"]
        got = arr[start:stop]
    assert np.array_equal(got, samples[sid]["aux"].view(torch.int16).numpy().view(np.uint16))
    # the shard index plus the spanned chunks, never the whole file
    assert sum(read_bytes) <= spanned * chunk_bytes + 16 * arr.nchunks + 64, (read_bytes, spanned)
    assert len(read_bytes) <= spanned + 1


def test_fp8_mode_is_lossy_but_close(tmp_path):
    samples = _samples(4, seed=3)
    for s in samples.values():
        s["aux"] = torch.randn(s["aux"].shape).to(torch.bfloat16)
    _write(tmp_path, samples, _metadata(dtype="fp8_e4m3"))
    cache = open_cache(tmp_path)
    for sid, expected in samples.items():
        got = cache.read(sid)
        assert np.array_equal(got.input_ids, expected["input_ids"])
        rel = (got.aux.float() - expected["aux"].float()).norm() / expected["aux"].float().norm()
        assert 0 < rel < 0.05  # e4m3 has 3 mantissa bits: a few percent, never exact
        assert got.final.shape == expected["final"].shape


def test_crashed_shard_is_never_read_and_is_cleaned_up_on_resume(tmp_path):
    samples = _samples(6, seed=4)
    meta = _metadata()
    create_or_check_cache(tmp_path, meta)
    writer = PartWriter(tmp_path, 0, 1, meta)
    for sid in range(3):
        writer.add(sid, **samples[sid])
    writer.flush()
    # a crash in the middle of the next shard leaves only its temporary directory behind
    tmp_shard = writer.dir / "shard-00001.zarr.tmp-deadbeef"
    tmp_shard.mkdir()
    (tmp_shard / "zarr.json").write_text("{}")
    assert list(open_cache(tmp_path, allow_partial=True).sample_ids) == [0, 1, 2]
    resumed = PartWriter(tmp_path, 0, 1, meta)
    assert not tmp_shard.exists() and resumed.committed == {0, 1, 2}
    for sid in range(3, 6):
        resumed.add(sid, **samples[sid])
    resumed.close()
    cache = open_cache(tmp_path)
    assert list(cache.sample_ids) == list(range(6))
    _assert_same(cache.read(4), samples[4])


def test_refusals_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a feature cache"):
        open_cache(tmp_path)
    _write(tmp_path, _samples(2), _metadata())
    with pytest.raises(UserError, match="other settings"):
        create_or_check_cache(tmp_path, _metadata(codec="none"))
    doc = json.loads((tmp_path / CACHE_FILE).read_text())
    doc["version"] = 99
    write_json_atomic(tmp_path / CACHE_FILE, doc)
    with pytest.raises(UserError, match="version 99 is not supported"):
        open_cache(tmp_path)
    doc["version"] = 1
    write_json_atomic(tmp_path / CACHE_FILE, doc)
    with pytest.raises(KeyError, match="not in the cache"):
        open_cache(tmp_path).read(7)


def test_a_failed_background_commit_is_raised_and_keeps_the_shards_before_it(tmp_path, monkeypatch):
    """Shards are committed by a background thread while the next one fills; its error reaches the caller."""
    import errno

    from eaglecache.precompute import writer as cache_writer

    samples = _samples(30, seed=5)
    meta = _metadata(shard_tokens=100)
    create_or_check_cache(tmp_path, meta)
    real_write_shard, calls = cache_writer.write_shard, []

    def write_shard_then_fill_the_disk(path, *args, **kwargs):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_shard(path, *args, **kwargs)

    monkeypatch.setattr(cache_writer, "write_shard", write_shard_then_fill_the_disk)
    writer = PartWriter(tmp_path, 0, 1, meta)
    with pytest.raises(OSError, match="No space left"):
        for sid in range(30):
            writer.add(sid, **samples[sid])
        writer.close()
    partial = open_cache(tmp_path, allow_partial=True)
    committed = [int(s) for s in partial.sample_ids]
    assert len(calls) == 3 and len(partial.shard_paths) == 2  # the two shards before the failure stay
    assert committed == list(range(len(committed))) and 0 < len(committed) < 30
    for sid in committed:
        assert np.array_equal(partial.read(sid).final.view(torch.int16), samples[sid]["final"].view(torch.int16))
