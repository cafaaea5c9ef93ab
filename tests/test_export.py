"""Export to vLLM's EAGLE3 draft format: config keys, tensor names and dtypes, what is shared, atomicity.

The training run here is written by hand in the documented layout (docs/formats.md section 4)
so the contract is checked on its own; loading the result in vLLM is covered by test_bench.py
and test_serve.py, and a run from the real trainer by test_demo.py.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from eaglecache.cli import main
from eaglecache.config import load_config
from eaglecache.errors import UserError
from eaglecache.formats.draft import read_draft_dir
from eaglecache.serve.export import (
    build_untrained_draft, draft_architecture, export_run, random_draft_tensors,
)
from eaglecache.target import target_config


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _fake_run(tmp_path, target, draft_vocab_size=None, extra=(), drop=()):
    """A finished run in the formats.md layout, with the tensors a trainer might also leave in."""
    arch = draft_architecture(target, draft_vocab_size=draft_vocab_size)
    tensors = {f"model.{n}": t for n, t in random_draft_tensors(arch, seed=1).items() if n not in drop}
    hidden, vocab = arch["hidden_size"], arch["vocab_size"]
    if "embed" in extra:
        tensors["embed_tokens.weight"] = torch.zeros(vocab, hidden)
    if "lm_head" in extra:
        tensors["lm_head.weight"] = torch.zeros(arch["draft_vocab_size"], hidden)
    if "d2t" in extra:
        n = arch["draft_vocab_size"]
        tensors["d2t"] = torch.arange(n, dtype=torch.int64) * ((vocab - 1) // max(n - 1, 1)) - torch.arange(n)
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(run / "final" / "model.safetensors"))
    (run / "final" / "draft.json").write_text(json.dumps(arch))
    config = load_config(None, ["train.lr=3e-4", "train.ttt_length=7"]).to_dict()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "run.json").write_text(json.dumps({"format": "eaglecache.run", "version": 1, "world_size": 2}))
    return run


def test_full_vocab_export_has_vllm_names_and_shares_embedding_and_head(tmp_path, tiny_target):
    run = _fake_run(tmp_path, tiny_target, extra=("embed", "lm_head", "d2t"))
    out = export_run(run, tmp_path / "draft", tiny_target)
    config, meta = read_draft_dir(out)
    target = target_config(tiny_target)

    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    assert config["vocab_size"] == config["draft_vocab_size"] == target["vocab_size"]
    assert config["target_hidden_size"] == target["hidden_size"]
    aux = [2, target["num_hidden_layers"] // 2, target["num_hidden_layers"] - 3]
    assert config["eagle_aux_hidden_state_layer_ids"] == aux
    assert config["eagle_config"] == {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": aux}
    assert config["max_position_embeddings"] >= target["max_position_embeddings"]
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        assert config.get(key) == target.get(key), key

    tensors = _tensors(out / "model.safetensors")
    assert not any(name.startswith("model.") for name in tensors)
    assert not {"embed_tokens.weight", "lm_head.weight", "d2t", "t2d"} & set(tensors)
    assert {"fc.weight", "norm.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight"} <= set(tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * config["hidden_size"]
    assert tensors["fc.weight"].shape == (config["hidden_size"], 3 * target["hidden_size"])
    source = _tensors(run / "final" / "model.safetensors")
    assert torch.equal(tensors["fc.weight"], source["model.fc.weight"])

    assert meta["source"] == "training run" and len(meta["weights_sha256"]) == 64
    card = (out / "README.md").read_text()
    assert "LlamaForCausalLMEagle3" in card and "| lr | 0.000300 |" in card and "| ttt_length | 7 |" in card
    assert "Not measured yet" in card


def test_reduced_vocab_export_keeps_head_and_mapping(tmp_path, tiny_target):
    run = _fake_run(tmp_path, tiny_target, draft_vocab_size=512, extra=("lm_head", "d2t"))
    out = export_run(run, tmp_path / "draft", tiny_target)
    config, _ = read_draft_dir(out)
    tensors = _tensors(out / "model.safetensors")
    assert config["draft_vocab_size"] == 512 < config["vocab_size"]
    assert tensors["lm_head.weight"].shape == (512, config["hidden_size"])
    assert tensors["d2t"].dtype == torch.int64 and tensors["d2t"].shape == (512,)
    assert tensors["t2d"].dtype == torch.bool


def test_reduced_vocab_without_mapping_is_refused(tmp_path, tiny_target):
    run = _fake_run(tmp_path, tiny_target, draft_vocab_size=512, extra=("lm_head",), drop=("d2t", "t2d"))
    with pytest.raises(UserError, match="lacks d2t"):
        export_run(run, tmp_path / "draft", tiny_target)


def test_missing_final_norm_is_taken_from_the_target(tmp_path, tiny_target):
    run = _fake_run(tmp_path, tiny_target, drop=("norm.weight",))
    out = export_run(run, tmp_path / "draft", tiny_target)
    norm = _tensors(out / "model.safetensors")["norm.weight"]
    target_norm = _tensors(tiny_target / "model.safetensors")["model.norm.weight"]
    assert torch.equal(norm, target_norm.to(torch.bfloat16))


def test_export_replaces_an_earlier_export_but_never_other_directories(tmp_path, tiny_target):
    run = _fake_run(tmp_path, tiny_target)
    out = export_run(run, tmp_path / "draft", tiny_target)
    first = json.loads((out / "export.json").read_text())["weights_sha256"]
    export_run(run, out, tiny_target)
    assert json.loads((out / "export.json").read_text())["weights_sha256"] == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an eaglecache export"):
        export_run(run, precious, tiny_target)
    assert (precious / "keep.txt").read_text() == "x"


def test_untrained_draft_is_seeded(tmp_path, tiny_target):
    a = _tensors(build_untrained_draft(tiny_target, tmp_path / "a", seed=3) / "model.safetensors")
    b = _tensors(build_untrained_draft(tiny_target, tmp_path / "b", seed=3) / "model.safetensors")
    c = _tensors(build_untrained_draft(tiny_target, tmp_path / "c", seed=4) / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    assert read_draft_dir(tmp_path / "a")[1]["source"].startswith("untrained")


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_target):
    assert main(["export", "--run-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                 f"target.path={tiny_target}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a finished training run" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_run_directory_of_the_previous_release_is_read_and_exported(tmp_path):
    """tests/fixtures/run_v1 was written by release 95dabc5's trainer functions (tests/fixtures/make_run_v1.py)."""
    from eaglecache.formats import run as run_format
    from eaglecache.formats.draft import REQUIRED_TENSORS, DraftArch

    run = FIXTURES / "run_v1"
    assert run_format.read_run_json(run)["total_steps"] == 2 and run_format.committed_steps(run) == []
    assert [r["step"] for r in run_format.read_metrics(run)] == [1, 2]
    assert load_config(run / "config.yaml").train.max_steps == 2
    doc = run_format.read_final_arch(run)
    arch = DraftArch.from_json(doc)
    assert arch.to_json() == {k: v for k, v in doc.items() if k != "provenance"} and arch.reduced_vocab

    out = export_run(run, tmp_path / "draft")
    config, meta = read_draft_dir(out)
    assert config["draft_vocab_size"] == 16 and config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert meta["run"]["format"] == "eaglecache.run" and meta["training"]["optimizer_steps"] == 2
    exported, saved = _tensors(out / "model.safetensors"), _tensors(run / "final" / "model.safetensors")
    assert set(exported) == {*REQUIRED_TENSORS, "norm.weight", "lm_head.weight", "d2t", "t2d"} == set(saved)
    assert all(torch.equal(exported[n], saved[n]) for n in saved)
    assert exported["fc.weight"].dtype == torch.bfloat16 and exported["d2t"].dtype == torch.int64
