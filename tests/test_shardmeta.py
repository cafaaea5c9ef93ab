"""A shard written from the metadata templates has zarr's own documents, and zarr reads its data back."""

import json

import numpy as np
import pytest
import zarr

from eaglecache.formats import cache as cache_format
from eaglecache.precompute import writer
from eaglecache.formats.shard_meta import CHUNK_KEY_ENCODING, compressors, shard_shape


def _arrays(lengths, num_aux=2, hidden=24, seed=0):
    rng = np.random.default_rng(seed)
    num_tokens = sum(lengths)
    return {"input_ids": rng.integers(0, 1000, num_tokens, dtype=np.int32),
            "loss_mask": rng.integers(0, 2, num_tokens, dtype=np.uint8),
            "aux": rng.integers(1, 30000, (num_tokens, num_aux, hidden), dtype=np.uint16),
            "final": rng.integers(1, 30000, (num_tokens, hidden), dtype=np.uint16)}


def _laid_out(arrays, lengths, codec, chunk_tokens=16):
    """The shard's rows for these samples as the writer lays them out (v2: each sample starts a chunk)."""
    starts, rows = cache_format.sample_starts(lengths, chunk_tokens, cache_format.is_aligned(cache_format.VERSION,
                                                                                             {"codec": codec}))
    out = {name: np.zeros((rows,) + data.shape[1:], data.dtype) for name, data in arrays.items()}
    for start, begin, n in zip(starts, np.cumsum(lengths) - lengths, lengths):
        for name, data in arrays.items():
            out[name][start:start + n] = data[begin:begin + n]
    return out, starts


def _zarrs_own(path, stored: dict[str, np.ndarray], *, codec, chunk_tokens, fp8):
    """The same shard written entirely through zarr's API: the reference."""
    group = zarr.open_group(path, mode="w", zarr_format=3,
                            attributes={"format": cache_format.FORMAT, "version": cache_format.VERSION, "fp8": fp8})
    for name, data in stored.items():
        per_token = name not in ("offsets", "sample_ids", "num_tokens")
        rows = cache_format.chunk_rows(name, chunk_tokens, codec)
        array = group.create_array(
            name, shape=data.shape, dtype=data.dtype,
            chunks=(rows,) + data.shape[1:] if per_token else data.shape,
            shards=shard_shape(data.shape, rows) if per_token else None,
            compressors=compressors(codec, 1, data.dtype.itemsize) if per_token else None,
            fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING)
        array[...] = data
    zarr.consolidate_metadata(path)


def _documents(shard_dir) -> dict[str, dict]:
    return {str(p.relative_to(shard_dir)): json.loads(p.read_text()) for p in sorted(shard_dir.rglob("zarr.json"))}


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
@pytest.mark.parametrize("codec, fp8", [("none", False), ("zstd", False), ("blosc-zstd", False), ("zstd", True)])
@pytest.mark.parametrize("lengths", [[5], [7, 30, 1], [16, 16]])  # a partial last chunk, several samples, exact chunks
def test_shard_documents_equal_zarrs_and_the_data_reads_back(tmp_path, codec, fp8, lengths):
    arrays, starts = _laid_out(_arrays(lengths), lengths, codec)
    record = writer.write_shard(tmp_path / "ours.zarr", arrays, list(range(3, 3 + len(lengths))), lengths,
                               codec=codec, codec_level=1, chunk_tokens=16, fp8=fp8)
    stored = {name: zarr.open_array(tmp_path / "ours.zarr" / name, mode="r")[...] for name in record["shapes"]}
    _zarrs_own(tmp_path / "theirs.zarr", stored, codec=codec, chunk_tokens=16, fp8=fp8)

    assert _documents(tmp_path / "ours.zarr") == _documents(tmp_path / "theirs.zarr")
    np.testing.assert_array_equal(stored["offsets"], np.concatenate([starts, [len(arrays["input_ids"])]]))
    if codec != "none":  # v2: each sample starts a chunk, the gaps are zeros
        assert (stored["offsets"][:-1] % 16 == 0).all() and stored["num_tokens"].tolist() == lengths
    np.testing.assert_array_equal(stored["sample_ids"], np.arange(3, 3 + len(lengths)))
    for name in ("input_ids", "loss_mask") + (() if fp8 else ("aux", "final")):
        np.testing.assert_array_equal(stored[name], arrays[name])
    group = zarr.open_consolidated(tmp_path / "ours.zarr", zarr_format=3)  # readers use the consolidated copy
    assert sorted(group.array_keys()) == sorted(record["shapes"])
    assert {name: list(group[name].shape) for name in group.array_keys()} == record["shapes"]
