"""The embedded tiny target: deterministic build, loss-mask template, a real LM, served by vLLM."""

import concurrent.futures
import hashlib
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eaglecache.target import chat_template_hash, default_aux_layer_ids, target_layer_count, weights_hash
from eaglecache.tiny_target import corpus
from eaglecache.tiny_target import build, spec as spec_module
from eaglecache.tiny_target.build import BUILD_REPORT, HELDOUT_FILE, build_tiny_target, ensure_tiny_target
from eaglecache.tiny_target.model import init_model, llama_config
from eaglecache.tiny_target.spec import TinyTargetSpec
from eaglecache.tiny_target.tokenizer import train_tokenizer

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.\nAnything else? \u00e9\u6f22 \U0001f600"},
    {"role": "user", "content": "No, thanks."},
    {"role": "assistant", "content": "  Bye!  "},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_target):
    return AutoTokenizer.from_pretrained(tiny_target)


@pytest.fixture(scope="module")
def model(tiny_target):
    return AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32).eval()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_in_its_spec(tmp_path):
    spec = TinyTargetSpec(tokenizer_train_chars=300_000, steps=2, seq_len=64, batch_size=2,
                          warmup_steps=1, eval_sequences=2)
    reports = [build_tiny_target(spec, tmp_path / name, progress=False) for name in ("a", "b")]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", HELDOUT_FILE):
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name), name
    assert reports[0]["loss"] == reports[1]["loss"]
    config = llama_config(spec, bos_id=0, eos_id=2, pad_id=3)
    weights = [init_model(config, seed).model.embed_tokens.weight for seed in (spec.seed, spec.seed + 1)]
    assert not torch.equal(weights[0], weights[1])


def test_concurrent_ensure_builds_once_and_second_call_is_instant(tmp_path, monkeypatch):
    calls = []

    def fake_build(spec, output, progress):  # the locking and renaming are what is tested here
        calls.append(output)
        time.sleep(0.5)
        (output / "config.json").write_text("{}")
        (output / BUILD_REPORT).write_text(json.dumps({"spec": spec.to_dict()}))

    monkeypatch.setattr(build, "_build_in_subprocess", fake_build)
    final = tmp_path / "target"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_target(output=final), range(3)))
    assert paths == [final] * 3 and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".target.lock", "target"]  # no temp dir left
    start = time.monotonic()
    assert ensure_tiny_target(output=final) == final
    assert time.monotonic() - start < 0.1 and len(calls) == 1
    ensure_tiny_target(output=final, force=True)
    assert len(calls) == 2


def test_build_key_changes_with_every_input_of_the_build(monkeypatch):
    """A build is reused on a machine only while its spec, code, corpus file and libraries are the same."""
    spec = TinyTargetSpec()
    inputs = spec_module.inputs_identity()
    assert set(inputs) == {"sharegpt_sha256", "torch", "tokenizers", "transformers"}
    assert inputs["torch"] == torch.__version__
    key = spec_module.build_key(spec)
    assert spec_module.build_key(spec) == key
    for name in inputs:
        monkeypatch.setattr(spec_module, "inputs_identity", lambda name=name: {**inputs, name: "other"})
        assert spec_module.build_key(spec) != key, name
    monkeypatch.setattr(spec_module, "inputs_identity", lambda: inputs)
    monkeypatch.setattr(spec_module, "source_hash", lambda: "other code")
    assert spec_module.build_key(spec) != key
    assert spec_module.build_key(TinyTargetSpec(seed=1)) != key


def test_cached_tokenizer_is_the_one_its_spec_trains(tiny_target):
    spec = TinyTargetSpec(**json.loads((tiny_target / BUILD_REPORT).read_text())["spec"])
    train, _ = corpus.load_split(spec.heldout_per_mille)
    retrained = train_tokenizer(corpus.iter_text(train, spec.tokenizer_train_chars), spec.vocab_size)
    assert retrained.backend_tokenizer.to_str() == AutoTokenizer.from_pretrained(tiny_target).backend_tokenizer.to_str()


def test_assistant_mask_covers_exactly_each_assistant_message_and_its_end_token(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    expected = [m["content"] + "<|im_end|>" for m in MESSAGES if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in spans] == expected
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou answer briefly.<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert len(tokenizer) == 4096


def test_target_metadata_helpers(tiny_target):
    assert target_layer_count(tiny_target) == 8
    assert default_aux_layer_ids(8) == [2, 4, 5]
    assert len(weights_hash(tiny_target)) == 64 and len(chat_template_hash(tiny_target)) == 64
    heldout = json.loads((tiny_target / HELDOUT_FILE).read_text())
    assert 200 < len(heldout["heldout_record_indices"]) < 600  # ~2 % of 17,671


def _heldout_windows(tokenizer, tiny_target, count, length):
    heldout = json.loads((tiny_target / HELDOUT_FILE).read_text())
    spec = json.loads((tiny_target / BUILD_REPORT).read_text())["spec"]
    train, held = corpus.load_split(spec["heldout_per_mille"])
    assert {i for i, _, _ in held} == set(heldout["heldout_record_indices"])
    assert not {i for i, _, _ in train} & set(heldout["heldout_record_indices"])

    def windows(conversations):
        for _, _, messages in conversations:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            if len(ids) >= length:
                yield ids[:length]

    picked = [w for w, _ in zip(windows(held[-3 * count:]), range(count))]
    train_tokens = [t for w, _ in zip(windows(train[:300]), range(300)) for t in w]
    return torch.tensor(picked), torch.tensor(train_tokens)


def test_model_is_a_real_language_model_clearly_below_unigram(tiny_target, tokenizer, model):
    report = json.loads((tiny_target / BUILD_REPORT).read_text())
    assert report["steps"] > 0
    # a real language model: at least 0.75 nats below the unigram model (each held-out token twice as
    # likely), in the float32 build sized for 10 minutes on an AVX2-only CPU
    assert report["loss"]["heldout"] < report["loss"]["unigram_heldout"] - 0.75
    assert report["compute_dtype"] == "float32"  # the same build on every CPU
    # Recomputed here on held-out conversations (whole windows from their start), not read back.
    windows, train_tokens = _heldout_windows(tokenizer, tiny_target, count=6, length=256)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    model_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    counts = torch.bincount(train_tokens, minlength=len(tokenizer)).double() + 1
    unigram_loss = -(counts / counts.sum()).log()[windows[:, 1:].reshape(-1)].mean()
    print(f"recomputed on held-out windows: model {model_loss.item():.3f} nats, unigram {unigram_loss.item():.3f}")
    assert model_loss.item() < unigram_loss.item() - 0.75, (model_loss.item(), unigram_loss.item())


def test_vllm_renders_the_chat_template_and_greedy_matches_transformers(target_engine, tokenizer, model):
    from vllm import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    conversations = [MESSAGES[:2], [{"role": "user", "content": "Write a short poem about the sea."}]]
    chat_outputs = target_engine.chat(conversations, greedy, use_tqdm=False)
    for messages, output in zip(conversations, chat_outputs):
        expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
        assert list(output.prompt_token_ids) == list(expected)
        with torch.no_grad():
            reference = model.generate(torch.tensor([expected]), max_new_tokens=24, min_new_tokens=24,
                                       do_sample=False)[0, len(expected):].tolist()
        assert list(output.outputs[0].token_ids) == reference
