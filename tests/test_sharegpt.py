"""The streaming ShareGPT reader: the shipped (truncated) file, synthetic files, role mapping."""

import json
import logging

import pytest

from eaglecache.data import sharegpt
from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages
from eaglecache.errors import UserError


def _record(i, turns=(("human", "hi"), ("gpt", "hello"))):
    return {"id": f"r{i}", "conversations": [{"from": f, "value": f"{v} {i} \u00e9\u6f22"} for f, v in turns]}


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == sharegpt.__name__]


def test_shipped_file_yields_every_complete_record_and_warns_once_about_the_tail(caplog):
    caplog.set_level(logging.WARNING)
    indices, ids = [], set()
    for index, record in iter_sharegpt(sharegpt_path()):
        indices.append(index)
        ids.add(record["id"])
        assert isinstance(record["conversations"], list)
    assert indices == list(range(17671))
    assert len(ids) == 17548  # ShareGPT repeats some ids: key records by index, not id
    (warning,) = _warnings(caplog)
    assert "cut off after 17671 complete records" in warning.getMessage()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_truncated_file_keeps_complete_records_across_chunk_boundaries(tmp_path, caplog, monkeypatch, chunk):
    monkeypatch.setattr(sharegpt, "CHUNK_CHARS", chunk)
    records = [_record(i) for i in range(5)]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"r4"') + 20], encoding="utf-8")  # cut inside the last record
    caplog.set_level(logging.WARNING)
    got = list(iter_sharegpt(path))
    assert got == list(enumerate(records[:4]))
    (warning,) = _warnings(caplog)
    assert "cut off after 4 complete records" in warning.getMessage()


@pytest.mark.parametrize("cut", ['"value": "hel', '"value": "hello \\', "}\n  ]", "}\n  ,"])
def test_cuts_at_awkward_places_are_truncation_not_errors(tmp_path, caplog, cut):
    head = json.dumps([_record(0)], indent=2)[:-2]  # drop the closing "\n]"
    path = tmp_path / "cut.json"
    path.write_text(head + ',\n  {"id": "r1", "conversations": [{"from": "gpt", ' + cut)
    caplog.set_level(logging.WARNING)
    assert [r["id"] for _, r in iter_sharegpt(path)] == ["r0"]
    assert len(_warnings(caplog)) == 1


def test_complete_file_and_json_lines_read_without_warning(tmp_path, caplog):
    records = [_record(i) for i in range(3)]
    array = tmp_path / "full.json"
    array.write_text(json.dumps(records))
    lines = tmp_path / "full.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    caplog.set_level(logging.WARNING)
    assert [r for _, r in iter_sharegpt(array)] == records
    assert [r for _, r in iter_sharegpt(lines)] == records
    assert not _warnings(caplog)


def test_bad_inputs_raise_one_line_user_errors(tmp_path):
    bad_utf8 = tmp_path / "latin1.json"
    bad_utf8.write_bytes(json.dumps([_record(0)]).encode()[:30] + b"\xff\xfe" + b'"}]')
    with pytest.raises(UserError, match="not valid UTF-8"):
        list(iter_sharegpt(bad_utf8))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []}, {"id": oops}, {"id": "c"}]')
    with pytest.raises(UserError, match="invalid JSON in record 1"):
        list(iter_sharegpt(broken))
    not_objects = tmp_path / "numbers.json"
    not_objects.write_text("[1, 2]")
    with pytest.raises(UserError, match="record 0 is a int"):
        list(iter_sharegpt(not_objects))
    with pytest.raises(UserError, match="not found"):
        list(iter_sharegpt(tmp_path / "missing.json"))
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty file"):
        list(iter_sharegpt(empty))


def test_roles_map_to_chat_messages_and_unknown_roles_are_named():
    record = _record(0, turns=(("system", "s"), ("human", "q"), ("gpt", "a"), ("user", "q2"), ("chatgpt", "a2")))
    roles = [m["role"] for m in sharegpt_to_messages(record)]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert sharegpt_to_messages(record)[2]["content"] == record["conversations"][2]["value"]
    with pytest.raises(ValueError, match="'narrator'"):
        sharegpt_to_messages(_record(0, turns=(("narrator", "x"),)))
