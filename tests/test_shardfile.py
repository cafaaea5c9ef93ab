"""The direct shard-file writer produces exactly the bytes zarr writes, and zarr reads them back."""

import numpy as np
import pytest
import zarr

from eaglecache.precompute.shardfile import direct_write_supported, write_shard_file
from eaglecache.precompute.store import use_fast_codec_pipeline


def _array(group, name, data, chunk_rows, compressors=None):
    shard_rows = -(-data.shape[0] // chunk_rows) * chunk_rows
    return group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=(chunk_rows,) + data.shape[1:],
        shards=(shard_rows,) + data.shape[1:], compressors=compressors, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )


@pytest.mark.parametrize("shape, dtype", [((37, 3, 8), np.uint16), ((40, 8), np.uint16), ((37,), np.int32),
                                          ((5,), np.uint8)])
@pytest.mark.parametrize("pipeline", ["zarr", "zarrs"])
def test_shard_file_is_byte_identical_to_zarrs_own(tmp_path, shape, dtype, pipeline):
    if pipeline == "zarrs" and not use_fast_codec_pipeline():
        pytest.skip("zarrs not installed")
    rng = np.random.default_rng(0)
    data = rng.integers(1, np.iinfo(dtype).max, size=shape, dtype=dtype)  # no all-zero chunk: zarr would omit it
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}
                         if pipeline == "zarr" else {}):
        ours = zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3)
        theirs = zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3)
        a, b = _array(ours, "x", data, 8), _array(theirs, "x", data, 8)
        assert direct_write_supported(a)
        write_shard_file(a, tmp_path / "ours.zarr", data)
        b[...] = data
        key = "x/" + a.metadata.encode_chunk_key((0,) * a.ndim)
        assert (tmp_path / "ours.zarr" / key).read_bytes() == (tmp_path / "theirs.zarr" / key).read_bytes()
        reread = zarr.open_array(tmp_path / "ours.zarr" / "x", mode="r")
        np.testing.assert_array_equal(reread[...], data)
        np.testing.assert_array_equal(reread[9:20], data[9:20])  # a read inside the shard, across chunks


def test_zeros_read_back_although_zarr_would_have_omitted_them(tmp_path):
    data = np.zeros((20, 4), np.uint16)
    data[17] = 7
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    write_shard_file(_array(group, "x", data, 8), tmp_path / "g.zarr", data)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "g.zarr" / "x", mode="r")[...], data)


def test_compressed_or_unsharded_arrays_are_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    data = np.ones((16, 4), np.uint16)
    assert not direct_write_supported(_array(group, "z", data, 8, compressors=zarr.codecs.ZstdCodec(level=1)))
    assert not direct_write_supported(group.create_array("plain", shape=(16, 4), dtype=np.uint16, chunks=(8, 4)))
    assert not direct_write_supported(group.create_array("cols", shape=(16, 4), dtype=np.uint16, chunks=(8, 2),
                                                         shards=(16, 4), compressors=None))
    with pytest.raises(ValueError, match="does not match"):
        write_shard_file(_array(group, "x", data, 8), tmp_path / "g.zarr", data[:8])
