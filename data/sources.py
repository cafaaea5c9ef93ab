"""Conversation input files -> normalized chat messages, with every unusable record classified.

Reads ShareGPT JSON (``from``/``value``, through ``data/sharegpt.py``), OpenAI-style messages
JSONL (one ``{"messages": [{"role", "content"}, ...]}`` per line; ShareGPT records per line work
too) and Parquet with a ``messages`` (or ``conversations``) column. ``iter_file`` yields, in file
order, a ``Conversation`` for every usable record and a ``Problem`` for everything else, so the
caller counts and reports bad input instead of crashing on it. Nothing here raises on bad data
except for a path that does not exist. ``record_index`` is the position in the JSON array (or
object stream), the 0-based line number in JSONL, and the row number in Parquet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from eaglecache.data.sharegpt import ROLE_MAP, iter_sharegpt, sharegpt_to_messages
from eaglecache.errors import UserError

ROLES = ("system", "user", "assistant")

# Reasons a record (or the rest of a file) is not used; the report counts each.
EMPTY_FILE = "empty_file"
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
TRUNCATED_FILE = "truncated_file"
MALFORMED = "malformed_record"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
NO_ASSISTANT = "no_assistant_turn"


@dataclass
class Conversation:
    source: str
    record_index: int
    messages: list[dict[str, str]]
    content_hash: str = ""  # set by the caller that deduplicates


@dataclass
class Problem:
    source: str
    record_index: int | None  # None: the whole file
    reason: str
    detail: str


class BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def content_hash(messages: list[dict[str, str]]) -> str:
    """sha256 of the normalized messages (role, content, optional reasoning), key order independent."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(NON_STRING_CONTENT, f"{what} is a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style JSON escapes
        raise BadRecord(INVALID_UTF8, f"{what} holds text that is not valid UTF-8") from None
    return value


def normalize_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI-style messages -> [{"role", "content"[, "reasoning_content", "token_ids"]}]; raises BadRecord.

    Roles system/user/assistant (ShareGPT speaker names are mapped too); content must be a string.
    An assistant ``reasoning_content`` string is kept so the model's template can render it, and
    an assistant's ``token_ids`` (the ids the target generated, from `data regenerate`) so that
    prepare can use them instead of re-tokenizing the content.
    """
    if not isinstance(raw, list):
        raise BadRecord(MALFORMED, f"messages is a {type(raw).__name__}, not a list")
    if not raw:
        raise BadRecord(NO_ASSISTANT, "no messages at all")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRecord(MALFORMED, f"message {i} is not an object")
        role = message.get("role")
        role = ROLE_MAP.get(role.lower(), role) if isinstance(role, str) else role
        if role not in ROLES:
            raise BadRecord(UNKNOWN_ROLE, f"message {i} has unknown role {message.get('role')!r}")
        out = {"role": role, "content": _check_text(message.get("content"), f"message {i} content")}
        reasoning = message.get("reasoning_content")
        if role == "assistant" and reasoning is not None:
            out["reasoning_content"] = _check_text(reasoning, f"message {i} reasoning_content")
        token_ids = message.get("token_ids")
        if role == "assistant" and token_ids is not None:
            if not isinstance(token_ids, list) or not all(isinstance(t, int) and t >= 0 for t in token_ids):
                raise BadRecord(MALFORMED, f"message {i} token_ids is not a list of token ids")
            out["token_ids"] = token_ids
        messages.append(out)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(NO_ASSISTANT, "no assistant turn")
    return messages


def _sharegpt_messages(record: dict) -> list[dict[str, str]]:
    try:
        messages = sharegpt_to_messages(record)
    except ValueError as exc:  # classify by looking at the record, not at the message wording
        turns = record.get("conversations")
        for turn in turns if isinstance(turns, list) else []:
            if isinstance(turn, dict):
                speaker = turn.get("from")
                if ROLE_MAP.get(speaker.lower() if isinstance(speaker, str) else speaker) is None:
                    raise BadRecord(UNKNOWN_ROLE, str(exc)) from None
                if not isinstance(turn.get("value"), str):
                    raise BadRecord(NON_STRING_CONTENT, str(exc)) from None
        raise BadRecord(MALFORMED, str(exc)) from None
    return normalize_messages(messages)


def record_to_messages(record: Any) -> list[dict[str, str]]:
    """A ShareGPT record (``conversations``) or a messages record (``messages``) -> messages."""
    if not isinstance(record, dict):
        raise BadRecord(MALFORMED, f"record is a {type(record).__name__}, not an object")
    if "messages" in record:
        return normalize_messages(record["messages"])
    if "conversations" in record:
        return _sharegpt_messages(record)
    raise BadRecord(MALFORMED, "record has neither 'messages' nor 'conversations'")


def _from_record(source: str, index: int, record: Any) -> Conversation | Problem:
    try:
        return Conversation(source, index, record_to_messages(record))
    except BadRecord as exc:
        return Problem(source, index, exc.reason, str(exc))


def _classify_file_error(message: str) -> str:
    if "empty file" in message:
        return EMPTY_FILE
    if "UTF-8" in message:
        return INVALID_UTF8
    return INVALID_JSON


def _ends_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 256, 0))
        return f.read().rstrip().endswith(b"]")


def _iter_json(path: Path, source: str) -> Iterator[Conversation | Problem]:
    last = -1
    try:
        for index, record in iter_sharegpt(path):
            last = index
            yield _from_record(source, index, record)
    except UserError as exc:  # broken mid-file: keep what came before, report the rest once
        yield Problem(source, None if last < 0 else last + 1, _classify_file_error(str(exc)), str(exc))
        return
    with open(path, "rb") as f:
        starts_array = f.read(4096).lstrip().startswith(b"[")
    if starts_array and not _ends_with_bracket(path):
        yield Problem(source, last + 1, TRUNCATED_FILE,
                      f"file is cut off after {last + 1} complete records; the incomplete tail is skipped")


def _iter_jsonl(path: Path, source: str) -> Iterator[Conversation | Problem]:
    seen_any = False
    with open(path, "rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            seen_any = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Problem(source, index, INVALID_UTF8, f"line {index + 1}: not valid UTF-8 at byte {exc.start}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Problem(source, index, INVALID_JSON, f"line {index + 1}: {exc.msg}")
                continue
            yield _from_record(source, index, record)
    if not seen_any:
        yield Problem(source, None, EMPTY_FILE, "empty file")


def _iter_parquet(path: Path, source: str) -> Iterator[Conversation | Problem]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        yield Problem(source, None, INVALID_JSON if path.stat().st_size else EMPTY_FILE,
                      f"not a Parquet file ({exc.__class__.__name__})")
        return
    names = pf.schema_arrow.names
    column = "messages" if "messages" in names else "conversations" if "conversations" in names else None
    if column is None:
        yield Problem(source, None, MALFORMED, f"no 'messages' column (columns: {', '.join(names)})")
        return
    if pf.metadata.num_rows == 0:
        yield Problem(source, None, EMPTY_FILE, "no rows")
        return
    index = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _from_record(source, index, {column: value})
            index += 1


def iter_file(path: str | Path) -> Iterator[Conversation | Problem]:
    """Every record of one input file, as a Conversation or a Problem, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    source = str(path)
    if path.stat().st_size == 0:
        yield Problem(source, None, EMPTY_FILE, "empty file")
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path, source)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, source)
    else:
        yield from _iter_json(path, source)
