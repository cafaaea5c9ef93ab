"""The prepared data set format: round trip, streaming order, atomic writes, version refusal."""

import json

import numpy as np
import pytest

from eaglecache.data import writer
from eaglecache.formats import dataset
from eaglecache.errors import UserError


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(1, 60))
        rows.append({"input_ids": rng.integers(0, 200064, length), "loss_mask": (rng.random(length) < 0.5),
                     "source": f"file{i % 3}.json", "record_index": 10 * i, "content_hash": f"hash{i}"})
    return rows


def test_round_trip_across_parts_and_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "ROWS_PER_PART", 2 * dataset.ROWS_PER_GROUP)
    rows = _rows(3 * dataset.ROWS_PER_GROUP + 7)
    meta = writer.write_dataset(tmp_path / "ds", iter(rows), {"report": {"records_in": len(rows)}})
    assert meta["num_parts"] == 2
    ds = dataset.open_dataset(tmp_path / "ds")
    assert len(ds) == len(rows) == ds.metadata["num_samples"]
    assert ds.metadata["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert ds.metadata["num_loss_tokens"] == sum(int(r["loss_mask"].sum()) for r in rows)
    for sample_id in [0, 1, dataset.ROWS_PER_GROUP - 1, dataset.ROWS_PER_GROUP, 2 * dataset.ROWS_PER_GROUP,
                      len(rows) - 1, 5]:
        sample, row = ds.sample(sample_id), rows[sample_id]
        assert sample["input_ids"].dtype == np.int32 and sample["loss_mask"].dtype == np.uint8
        np.testing.assert_array_equal(sample["input_ids"], row["input_ids"])
        np.testing.assert_array_equal(sample["loss_mask"], row["loss_mask"])
        assert (sample["source"], sample["record_index"], sample["content_hash"]) == \
            (row["source"], row["record_index"], row["content_hash"])
    streamed = list(ds.iter_samples(start=200, stop=600))
    assert [s["sample_id"] for s in streamed] == list(range(200, 600))
    np.testing.assert_array_equal(ds.num_tokens_array(), [len(r["input_ids"]) for r in rows])


def test_dataset_hash_depends_on_tokens_and_order(tmp_path):
    rows = _rows(20)
    a = writer.write_dataset(tmp_path / "a", rows, {})["dataset_hash"]
    assert writer.write_dataset(tmp_path / "b", rows, {})["dataset_hash"] == a
    assert writer.write_dataset(tmp_path / "c", rows[::-1], {})["dataset_hash"] != a
    rows[3]["input_ids"] = rows[3]["input_ids"] + 1
    assert writer.write_dataset(tmp_path / "d", rows, {})["dataset_hash"] != a


def test_failed_write_leaves_nothing_and_keeps_the_old_set(tmp_path):
    writer.write_dataset(tmp_path / "ds", _rows(5), {"tag": "old"})

    def failing():
        yield from _rows(300)
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        writer.write_dataset(tmp_path / "ds", failing(), {"tag": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert dataset.open_dataset(tmp_path / "ds").metadata["tag"] == "old"


def test_unknown_version_and_missing_set_are_refused(tmp_path):
    with pytest.raises(UserError, match="not a prepared data set"):
        dataset.open_dataset(tmp_path / "nothing")
    writer.write_dataset(tmp_path / "ds", _rows(3), {})
    meta_path = tmp_path / "ds" / dataset.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["version"] = dataset.DATASET_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version"):
        dataset.open_dataset(tmp_path / "ds")


def test_row_groups_are_bounded_in_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "TOKENS_PER_GROUP", 500)
    monkeypatch.setattr(writer, "ROWS_PER_PART", 100)
    rows = _rows(400, seed=1)
    writer.write_dataset(tmp_path / "ds", rows, {})
    ds = dataset.open_dataset(tmp_path / "ds")
    import pyarrow.parquet as pq

    group_tokens = [sum(f.read_row_group(g, columns=["num_tokens"]).column(0).to_pylist())
                    for f in ds._files for g in range(f.num_row_groups)]
    assert len(ds._files) == 4 and max(group_tokens) < 500 + 60 and sum(group_tokens) == ds.metadata["num_tokens"]
    for sample_id in range(0, 400, 7):
        np.testing.assert_array_equal(ds.sample(sample_id)["input_ids"], rows[sample_id]["input_ids"])
    assert [s["sample_id"] for s in ds.iter_samples(13, 377)] == list(range(13, 377))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in sorted((tmp_path / "ds").glob("part-*"))) == 400
