"""``eaglecache data vocab``: the reduced draft vocabulary, written as ``eaglecache.vocab`` v1 (formats/vocab.py).

The draft vocab is the ``draft_vocab_size`` target tokens seen most often among loss-masked tokens of
a prepared data set (ties broken by the smaller token id), listed in ascending target id. Saved as
safetensors: ``d2t`` int64[draft_vocab] offsets (target id = draft id + d2t[draft id]) and ``t2d``
bool[vocab] (target id is in the draft vocab); eaglecache/formats/vocab.py owns the format and its
reader, which precompute, train and export use.
With ``draft_vocab_size`` null the draft keeps the full vocab and shares the target's LM head: no
mapping exists, and vLLM refuses a full-vocab draft that carries ``d2t``, so nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eaglecache.errors import UserError
from eaglecache.formats.dataset import open_dataset
from eaglecache.formats.vocab import D2T, T2D, header
from eaglecache.target import target_config, tokenizer_hash


def count_loss_tokens(dataset, vocab_size: int, show_progress: bool = True) -> np.ndarray:
    """How often each target token id occurs among loss-masked tokens (int64[vocab_size])."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    groups = dataset.iter_loss_tokens()
    for ids in tqdm(groups, desc="count", unit="group", disable=not show_progress, mininterval=1.0):
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise UserError(f"{dataset.path}: token id {int(ids.max())} is outside the target vocab of "
                            f"{vocab_size} (data set prepared for another tokenizer?)")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def select_draft_vocab(counts: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(d2t int64[draft_vocab_size], t2d bool[vocab]) of the top ``draft_vocab_size`` counts."""
    vocab_size = len(counts)
    if not 0 < draft_vocab_size <= vocab_size:
        raise UserError(f"draft_vocab_size {draft_vocab_size} must be in 1..{vocab_size} (the target vocab)")
    by_frequency = np.lexsort((np.arange(vocab_size), -counts))  # count descending, then id ascending
    draft_to_target = np.sort(by_frequency[:draft_vocab_size])
    d2t = (draft_to_target - np.arange(draft_vocab_size)).astype(np.int64)
    t2d = np.zeros(vocab_size, dtype=bool)
    t2d[draft_to_target] = True
    return d2t, t2d


def save_vocab(path: str | Path, d2t: np.ndarray, t2d: np.ndarray, metadata: dict[str, str]) -> None:
    """Write the mapping atomically (temp file beside it, then rename)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({D2T: torch.from_numpy(d2t), T2D: torch.from_numpy(t2d)}, str(tmp), metadata=header(metadata))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_vocab(dataset_dir: str | Path, output: str | Path, draft_vocab_size: int | None,
                target_path: str | Path, show_progress: bool = True) -> dict | None:
    """Count, select and save; returns the saved metadata, or None for the full vocab (nothing written)."""
    dataset = open_dataset(dataset_dir)
    vocab_size = int(target_config(target_path)["vocab_size"])
    if draft_vocab_size is None or draft_vocab_size == vocab_size:
        return None
    if dataset.metadata.get("tokenizer_hash") not in (None, tokenizer_hash(target_path)):
        raise UserError(f"{dataset_dir} was prepared with another tokenizer than the target {target_path}'s")
    counts = count_loss_tokens(dataset, vocab_size, show_progress)
    d2t, t2d = select_draft_vocab(counts, draft_vocab_size)
    total = int(counts.sum())
    covered = int(counts[t2d].sum())
    metadata = {"dataset_hash": dataset.metadata["dataset_hash"], "draft_vocab_size": draft_vocab_size,
                "vocab_size": vocab_size, "tokenizer_hash": tokenizer_hash(target_path),
                "loss_tokens": total, "loss_tokens_covered": covered,
                "distinct_loss_tokens": int((counts > 0).sum())}
    save_vocab(output, d2t, t2d, metadata)
    return metadata


def run_vocab(config, *, data: str | Path, output: str | Path) -> int:
    """Build the draft vocab mapping of the prepared data set ``data`` into ``output`` (none for the full vocab)."""
    from eaglecache.target import resolve_target

    size = config.data.draft_vocab_size
    meta = build_vocab(data, output, size, resolve_target(config))
    if meta is None:
        print("data.draft_vocab_size is null (full target vocab, LM head shared with the target): "
              "no vocab mapping is needed; nothing written")
        return 0
    share = meta["loss_tokens_covered"] / max(meta["loss_tokens"], 1)
    print(f"wrote {output}: draft vocab {meta['draft_vocab_size']:,} of {meta['vocab_size']:,} target tokens "
          f"covers {share:.2%} of {meta['loss_tokens']:,} loss-masked tokens "
          f"({meta['distinct_loss_tokens']:,} distinct seen)")
    return 0
