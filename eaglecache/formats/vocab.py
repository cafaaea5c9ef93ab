"""The draft vocabulary mapping format, ``eaglecache.vocab`` v1 (docs/formats.md section 3): names and reader.

One safetensors file with two tensors: ``d2t`` int64[draft_vocab] offsets (target id = draft id +
d2t[draft id]) and ``t2d`` bool[vocab] (target id is in the draft vocab). Its safetensors metadata
holds ``format`` and ``version`` (strings, as safetensors stores them) and the provenance the writer
adds (dataset_hash, tokenizer_hash, sizes). ``data vocab`` writes it (data/vocab.py); precompute,
train and export read it through ``read_vocab``, which refuses a missing file, a damaged one and an
unknown format or version with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eaglecache.errors import UserError

VOCAB_FORMAT = "eaglecache.vocab"
VOCAB_VERSION = 1
D2T = "d2t"  # int64[draft_vocab]: target id = draft id + d2t[draft id]
T2D = "t2d"  # bool[vocab]: target id is in the draft vocab


def header(metadata: dict[str, object]) -> dict[str, str]:
    """The safetensors metadata of a mapping: format and version first, then the writer's own keys."""
    return {"format": VOCAB_FORMAT, "version": str(VOCAB_VERSION), **{k: str(v) for k, v in metadata.items()}}


def read_vocab(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(d2t, t2d, metadata) of a vocab mapping; refuses a missing file or an unknown format/version."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"vocab mapping not found: {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != VOCAB_FORMAT or meta.get("version") != str(VOCAB_VERSION):
                raise UserError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} "
                                f"is not {VOCAB_FORMAT!r} version {VOCAB_VERSION}")
            return f.get_tensor(D2T), f.get_tensor(T2D), meta
    except (OSError, ValueError) as exc:  # safetensors reports a damaged file as one of these
        raise UserError(f"{path}: not a readable safetensors vocab mapping ({exc})") from None


def is_vocab_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file that says it is a vocab mapping (any version)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format") == VOCAB_FORMAT
    except Exception:  # safetensors' own error type for a file that is not safetensors
        return False
