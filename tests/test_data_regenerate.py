"""data regenerate through vLLM on the tiny target: turn-by-turn answers equal vLLM's own chat generation."""

import json

import numpy as np
import pytest

from conftest import TARGET_ENGINE_OVERRIDES
from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.data import regenerate
from eaglecache.data.config import DataConfig
from eaglecache.data.prepare import prepare_dataset
from eaglecache.formats.dataset import open_dataset
from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path
from eaglecache.data.template import ChatTemplate
from eaglecache.errors import UserError

MAX_NEW = 12


@pytest.fixture(scope="module")
def config(tiny_target):
    return load_config(None, [f"target.path={tiny_target}", *TARGET_ENGINE_OVERRIDES,
                              f"data.regenerate.max_new_tokens={MAX_NEW}", "data.regenerate.batch_size=4"])


@pytest.fixture(scope="module")
def engine(target_engine):
    """The session's engine of the target alone: what ``regenerate.make_engine`` starts for ``config``."""
    return target_engine


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """Ten short real ShareGPT conversations (four multi-turn) that fit the context with their answers."""
    single, multi = [], []
    for _, record in iter_sharegpt(sharegpt_path()):
        turns = record["conversations"]
        if not turns or sum(len(t["value"]) for t in turns) > 1000 or turns[0]["from"] != "human":
            continue
        if len(turns) == 2 and len(single) < 6:
            single.append(record)
        elif 4 <= len(turns) <= 6 and len(multi) < 4:
            multi.append(record)
        if len(single) + len(multi) == 10:
            break
    records = [r for pair in zip(single, multi + [None] * 2) for r in pair if r is not None]
    path = tmp_path_factory.mktemp("regen") / "in.json"
    path.write_text(json.dumps(records))
    return path, records


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, conversations, engine, config, tiny_target):
    out = tmp_path_factory.mktemp("regen-out") / "out.jsonl"
    report = regenerate.regenerate_file(conversations[0], out, config, tiny_target, llm=engine, show_progress=False)
    return out, report, [json.loads(line)["messages"] for line in out.read_text().splitlines()]


def test_answers_equal_vllm_chat_turn_by_turn(engine, regenerated, conversations):
    from vllm import SamplingParams

    _, report, outputs = regenerated
    _, records = conversations
    assert report["records_out"] == len(outputs) == len(records) and report["cut_short"] == 0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, skip_special_tokens=False)
    num_turns = max(sum(m["role"] == "assistant" for m in o) for o in outputs)
    compared = 0
    for k in range(num_turns):
        prompts, expected = [], []
        for messages in outputs:
            answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if k < len(answers):
                prompts.append([{"role": m["role"], "content": m["content"]} for m in messages[:answers[k]]])
                expected.append((messages[answers[k]]["content"], messages[answers[k]]["token_ids"]))
        got = [(o.outputs[0].text, [t for t in o.outputs[0].token_ids if t != engine.get_tokenizer().eos_token_id])
               for o in engine.chat(prompts, params, use_tqdm=False)]
        assert got == expected  # the text and the very tokens the target generated
        compared += len(got)
    assert compared == report["turns_regenerated"] > len(records)


def test_user_turns_are_kept_and_only_answers_change(regenerated, conversations):
    _, _, outputs = regenerated
    _, records = conversations
    for messages, record in zip(outputs, records):
        original = [(t["from"], t["value"]) for t in record["conversations"]]
        assert [m["content"] for m in messages if m["role"] == "user"] == [v for f, v in original if f == "human"]
        assert sum(m["role"] == "assistant" for m in messages) == sum(f == "gpt" for f, _ in original)
    originals = {t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"}
    assert not originals & {m["content"] for o in outputs for m in o if m["role"] == "assistant"}


def test_prepare_reads_the_regenerated_file_and_masks_its_answers(tmp_path, regenerated, tiny_target):
    out, _, outputs = regenerated
    side = json.loads(out.with_name(out.name + ".json").read_text())
    assert side["format"] == "eaglecache.regenerated" and side["target_weights_hash"]
    prepare_dataset([out], tmp_path / "ds", DataConfig(max_seq_length=4096), tiny_target, show_progress=False)
    template = ChatTemplate(tiny_target)
    for sample in open_dataset(tmp_path / "ds").iter_samples():
        answers = [m["content"] for m in outputs[sample["record_index"]] if m["role"] == "assistant"]
        ids, mask = sample["input_ids"], sample["loss_mask"].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        runs = [template.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
        assert runs == [a + template.tokenizer.eos_token for a in answers]
        generated = [m["token_ids"] for m in outputs[sample["record_index"]] if m["role"] == "assistant"]
        assert [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])] == \
            [g + [template.tokenizer.eos_token_id] for g in generated]  # the target's tokens, not a re-tokenization
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())["report"]
    assert report["answers_with_generated_ids"] == sum(m["role"] == "assistant" for o in outputs for m in o)
    assert report["answers_retokenized"] == 0


def test_limit_cli_and_atomic_output(tmp_path, engine, config, tiny_target, conversations, monkeypatch, capsys):
    monkeypatch.setattr(regenerate, "make_engine", lambda config, path: engine)
    out = tmp_path / "three.jsonl"
    assert main(["data", "regenerate", "--input", str(conversations[0]), "--output", str(out), "--limit", "3",
                 f"target.path={tiny_target}", "target.gpu_memory_utilization=0.05",
                 f"data.regenerate.max_new_tokens={MAX_NEW}"]) == 0
    assert len(out.read_text().splitlines()) == 3 and "conversations in 3, out 3" in capsys.readouterr().out

    unanswerable = tmp_path / "questions.jsonl"
    unanswerable.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer here"}]}) + "\n")
    with pytest.raises(UserError, match="no conversation could be regenerated"):
        regenerate.regenerate_file(unanswerable, tmp_path / "none.jsonl", config, tiny_target, llm=engine,
                                   show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["questions.jsonl", "three.jsonl", "three.jsonl.json"]
