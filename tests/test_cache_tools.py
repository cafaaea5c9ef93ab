"""The writer side without vLLM: the sink skips NaN/Inf samples, jobs split the data set by tokens,
and ``cache info`` / ``cache verify`` report what a cache holds and name damaged shards."""


import numpy as np
import pytest
import torch

from eaglecache.precompute.run import split_parts
from eaglecache.precompute.sink import Extracted, StateSink
from eaglecache.formats.cache_reader import open_cache
from eaglecache.precompute.writer import PartWriter, create_or_check_cache
from eaglecache.precompute.cache_tools import run_info, run_verify

A, H = 3, 16
META = {"aux_layer_ids": [1, 2, 3], "final_layer_id": 4, "num_hidden_layers": 4, "hidden_size": H,
        "vocab_size": 100, "dtype": "bfloat16", "codec": "zstd", "codec_level": 1, "chunk_tokens": 8,
        "shard_tokens": 40, "num_parts": 1, "layer_convention": "vllm", "target_path": "t",
        "target_weights_hash": "w" * 64, "tokenizer_hash": "t" * 64, "chat_template_hash": "c" * 64,
        "dataset_hash": "d" * 64, "dataset_num_samples": 10, "vllm_version": "0.32.0",
        "tensor_parallel_size": 1}


def _sink_cache(path, nan_samples=(3,)):
    """10 samples through the sink, as the connector hands them over on CPU."""
    create_or_check_cache(path, META)
    sink = StateSink(PartWriter(path, 0, 1, META), max_pending_bytes=4096)  # tiny budget: put must wait
    states = {}
    for sid in range(10):
        t = 5 + sid
        x = torch.randn(t, A + 1, H).to(torch.bfloat16)
        if sid in nan_samples:
            x[t // 2, 1, 3] = float("nan") if sid % 2 else float("inf")
        states[sid] = x
        sink.put(Extracted(sid, np.arange(t, dtype=np.int32), np.ones(t, np.uint8), x))
    summary = sink.close(complete=True)
    return summary, states


def test_sink_writes_finite_samples_and_lists_the_others(tmp_path):
    summary, states = _sink_cache(tmp_path, nan_samples=(3, 6))
    assert summary["samples"] == 8 and summary["skipped"] == 2 and summary["complete"]
    assert [s["sample_id"] for s in summary["skipped_samples"]] == [3, 6]
    cache = open_cache(tmp_path)
    assert [int(s) for s in cache.sample_ids] == [0, 1, 2, 4, 5, 7, 8, 9]
    assert [s["sample_id"] for s in cache.skipped] == [3, 6]
    for sid in cache.sample_ids:
        got = cache.read(sid)
        assert torch.equal(got.aux.view(torch.int16), states[sid][:, :A].view(torch.int16))
        assert torch.equal(got.final.view(torch.int16), states[sid][:, A].view(torch.int16))


def test_parts_split_by_tokens_cover_every_sample_once():
    num_tokens = np.array([5, 100, 3, 3, 3, 50, 50, 1, 1, 200, 7])
    for num_parts in (1, 2, 3, 5, 11, 20):
        ranges = split_parts(num_tokens, num_parts)
        assert len(ranges) == num_parts and ranges[0][0] == 0 and ranges[-1][1] == len(num_tokens)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    ranges = split_parts(np.full(100, 10), 4)
    assert [b - a for a, b in ranges] == [25, 25, 25, 25]
    assert split_parts(num_tokens, 3) == split_parts(num_tokens.copy(), 3)


def test_info_prints_contents_and_size(tmp_path, capsys):
    _sink_cache(tmp_path)
    assert run_info(tmp_path) == 0
    out = capsys.readouterr().out
    assert "9 samples" in out and "1 skipped" in out and "1 of 1 complete" in out and "bytes/token" in out


def test_verify_names_the_damaged_shard_and_repair_requeues_it(tmp_path, capsys):
    _sink_cache(tmp_path, nan_samples=())
    assert run_verify(tmp_path) == 0
    cache = open_cache(tmp_path)
    victim = cache.shard_paths[1]
    shard_file = victim / "aux" / "c.0.0.0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a compressed chunk
    shard_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_verify(tmp_path) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED {victim}" in out and out.count("DAMAGED") == 1
    lost = [int(s) for s in cache.sample_ids if cache._shard_of[cache._find(s)] == 1]

    assert run_verify(tmp_path, repair=True) == 1
    with pytest.raises(Exception, match="incomplete cache"):
        open_cache(tmp_path)
    partial = open_cache(tmp_path, allow_partial=True)
    assert not set(lost) & {int(s) for s in partial.sample_ids}
    writer = PartWriter(tmp_path, 0, 1, META)  # what the next precompute run of the part does
    assert not victim.with_name(victim.name + ".tmp-damaged").exists()
    assert writer.committed == {int(s) for s in partial.sample_ids}


def test_verify_names_shard_data_without_a_manifest_entry_and_repair_removes_it(tmp_path, capsys):
    import shutil

    _sink_cache(tmp_path, nan_samples=())
    cache = open_cache(tmp_path)
    stray = cache.shard_paths[0].with_name("shard-00099.zarr")  # renamed into place, never recorded
    shutil.copytree(cache.shard_paths[0], stray)
    assert run_verify(tmp_path) == 1
    out = capsys.readouterr().out
    assert f"UNLISTED {stray}" in out and "0 damaged, 1 unlisted" in out
    assert list(open_cache(tmp_path).sample_ids) == list(cache.sample_ids)  # never read as data
    assert run_verify(tmp_path, repair=True) == 1 and not stray.exists()
    assert run_verify(tmp_path) == 0


def test_precompute_refuses_a_shard_index_outside_the_job_array(tmp_path, capsys):
    from eaglecache.cli import main

    assert main(["precompute", "--input", str(tmp_path), "--output", str(tmp_path / "c"),
                 "--shard-index", "2", "--num-shards", "2"]) == 2
    assert "--shard-index 2 must be in 0..1" in capsys.readouterr().err
