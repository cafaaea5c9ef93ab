"""ShareGPT as the tiny target's corpus: the deterministic held-out split and the conversations.

A conversation is held out when ``sha256(id) mod 1000 < heldout_per_mille``; the split depends
on the record id only, so it is the same whatever else changes. Held-out ids are written to
``heldout.json`` in the built target: the serve stage benchmarks on conversations the target
never saw in training. ShareGPT repeats some ids (17,548 distinct among 17,671 records); the
split is by id, so all copies of an id fall on the same side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages

Conversation = tuple[int, str, list[dict]]  # (record index in the file, record id, chat messages)


def corpus_file() -> Path:
    """The ShareGPT file the target is trained on (its hash is part of the build's cache key)."""
    return sharegpt_path()


def is_heldout(record_id: str, heldout_per_mille: int) -> bool:
    digest = hashlib.sha256(str(record_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < heldout_per_mille


def load_split(heldout_per_mille: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out) conversations of the shipped ShareGPT file, in file order, in one pass.

    Records with an unknown role or only blank turns are skipped: they are not usable chats.
    """
    train, heldout = [], []
    for index, record in iter_sharegpt(sharegpt_path()):
        record_id = str(record.get("id"))
        try:
            messages = sharegpt_to_messages(record)
        except ValueError:
            continue
        if any(m["content"].strip() for m in messages):
            (heldout if is_heldout(record_id, heldout_per_mille) else train).append((index, record_id, messages))
    return train, heldout


def iter_text(conversations: list[Conversation], max_chars: int) -> Iterator[str]:
    """Message texts of ``conversations`` in order, up to about ``max_chars`` characters."""
    total = 0
    for _, _, messages in conversations:
        for message in messages:
            yield message["content"]
            total += len(message["content"])
        if total >= max_chars:
            return
