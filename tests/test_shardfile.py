"""The direct shard-file writer produces exactly the bytes zarr writes, and zarr reads them back."""

import numpy as np
import pytest
import zarr

import errno
import json
import os

from eaglecache.precompute import shardfile
from eaglecache.precompute.shardfile import aligned_empty, direct_write_supported, write_shard_file
from eaglecache.formats.shard_meta import use_fast_codec_pipeline


def _doc(array) -> dict:
    """The array's metadata document as zarr wrote it (its zarr.json)."""
    return json.loads(array.store_path.store.root.joinpath(array.path, "zarr.json").read_text())


def _array(group, name, data, chunk_rows, compressors=None):
    shard_rows = -(-data.shape[0] // chunk_rows) * chunk_rows
    return group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=(chunk_rows,) + data.shape[1:],
        shards=(shard_rows,) + data.shape[1:], compressors=compressors, fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )


ZARR_PIPELINE = {"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}


def _zarrs_own_file(tmp_path, data, chunk_rows) -> bytes:
    """The shard file zarr's own pipeline writes for ``data``. Not zarrs': it places inner chunks in the
    order its threads finish them (legal, the index says where each is), so its bytes vary run to run."""
    with zarr.config.set(ZARR_PIPELINE):
        array = _array(zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=3), "x", data, chunk_rows)
        array[...] = data
    return (tmp_path / "theirs.zarr" / "x" / array.metadata.encode_chunk_key((0,) * array.ndim)).read_bytes()


@pytest.mark.parametrize("shape, dtype", [((37, 3, 8), np.uint16), ((40, 8), np.uint16), ((37,), np.int32),
                                          ((5,), np.uint8)])
@pytest.mark.parametrize("pipeline", ["zarr", "zarrs"])
def test_shard_file_is_byte_identical_to_zarrs_own_and_both_pipelines_read_it(tmp_path, shape, dtype, pipeline):
    if pipeline == "zarrs" and not use_fast_codec_pipeline():
        pytest.skip("zarrs not installed")
    rng = np.random.default_rng(0)
    data = rng.integers(1, np.iinfo(dtype).max, size=shape, dtype=dtype)  # no all-zero chunk: zarr would omit it
    with zarr.config.set(ZARR_PIPELINE if pipeline == "zarr" else {}):
        ours = _array(zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3), "x", data, 8)
        assert direct_write_supported(_doc(ours), data)
        write_shard_file(_doc(ours), tmp_path / "ours.zarr" / "x", data)
        key = "x/" + ours.metadata.encode_chunk_key((0,) * ours.ndim)
        assert (tmp_path / "ours.zarr" / key).read_bytes() == _zarrs_own_file(tmp_path, data, 8)
        reread = zarr.open_array(tmp_path / "ours.zarr" / "x", mode="r")
        np.testing.assert_array_equal(reread[...], data)
        np.testing.assert_array_equal(reread[9:20], data[9:20])  # a read inside the shard, across chunks


def test_zeros_read_back_although_zarr_would_have_omitted_them(tmp_path):
    data = np.zeros((20, 4), np.uint16)
    data[17] = 7
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    write_shard_file(_doc(_array(group, "x", data, 8)), tmp_path / "g.zarr" / "x", data)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "g.zarr" / "x", mode="r")[...], data)


def test_compressed_or_unsharded_arrays_are_left_to_zarr(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    data = np.ones((16, 4), np.uint16)
    assert not direct_write_supported(_doc(_array(group, "z", data, 8, compressors=zarr.codecs.ZstdCodec(level=1))), data)
    assert not direct_write_supported(_doc(group.create_array("plain", shape=(16, 4), dtype=np.uint16, chunks=(8, 4))), data)
    assert not direct_write_supported(_doc(group.create_array("cols", shape=(16, 4), dtype=np.uint16, chunks=(8, 2),
                                                              shards=(16, 4), compressors=None)), data)
    x = _doc(_array(group, "x", data, 8))
    assert not direct_write_supported(x, data[:8]) and not direct_write_supported(x, data.astype(np.int32))
    with pytest.raises(ValueError, match="does not fit"):
        write_shard_file(x, tmp_path / "g.zarr" / "x", data[:8])


def _o_direct_works(directory) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


@pytest.mark.parametrize("aligned", [True, False])
def test_bulk_goes_out_with_o_direct_from_an_aligned_buffer_and_the_bytes_stay_zarrs(tmp_path, aligned):
    rng = np.random.default_rng(1)
    shape = (300, 3, 40)  # 72,000 bytes: 17 whole 4 KiB blocks, then a partial one and the index
    data = aligned_empty(shape, np.uint16) if aligned else np.empty(np.prod(shape) + 1, np.uint16)[1:].reshape(shape)
    data[...] = rng.integers(1, 60000, size=shape, dtype=np.uint16)
    ours = _array(zarr.open_group(tmp_path / "ours.zarr", mode="w", zarr_format=3), "x", data, 64)
    went_direct = write_shard_file(_doc(ours), tmp_path / "ours.zarr" / "x", data)
    assert went_direct == (aligned and _o_direct_works(tmp_path))
    key = "x/" + ours.metadata.encode_chunk_key((0,) * ours.ndim)
    assert (tmp_path / "ours.zarr" / key).read_bytes() == _zarrs_own_file(tmp_path, data, 64)


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_file_system_refusing_o_direct_gets_the_same_bytes_buffered(tmp_path, monkeypatch, refused_at):
    real_open, real_write = os.open, os.write
    direct_fds = set()

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(shardfile.os, "open", fake_open)
    monkeypatch.setattr(shardfile.os, "write", fake_write)
    data = aligned_empty((300, 40), np.uint16)
    data[...] = np.arange(12000, dtype=np.uint16).reshape(300, 40) + 1
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    assert not write_shard_file(_doc(_array(group, "x", data, 64)), tmp_path / "g.zarr" / "x", data)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "g.zarr" / "x", mode="r")[...], data)


def test_a_disk_error_during_an_o_direct_write_is_raised_not_hidden(tmp_path, monkeypatch):
    real_write, calls = os.write, []

    def failing_write(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(shardfile, "WRITE_BYTES", 8192)
    monkeypatch.setattr(shardfile.os, "write", failing_write)
    data = aligned_empty((300, 40), np.uint16)
    data[...] = 1
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    if not _o_direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    with pytest.raises(OSError, match="No space"):
        write_shard_file(_doc(_array(group, "x", data, 64)), tmp_path / "g.zarr" / "x", data)
