"""MiniMax-M3's checkpoint layout on a small stand-in: export-relevant loading and a few training steps.

The stand-in has what the real checkpoint has, only small: a VL config.json whose
``text_config`` holds the text model's dimensions and RoPE (60 layers, so the default
aux layers are the seed's 2/30/57), sharded safetensors with an index file, the text
model under ``language_model.`` and vision tensors beside it. One shard holds only
vision tensors and is overwritten with garbage once the index is written, so any code
that opens it fails; a spy on safetensors records every tensor read. Training runs the
real trainer in-process (DeepSpeed ZeRO-3, one gloo rank) with configs/minimax_m3/config.yaml
from a cache written by precompute's own writer, then the run is exported.
"""

import json

import numpy as np
import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eaglecache.config import PACKAGED_CONFIGS, load_config
from eaglecache.errors import UserError
from eaglecache.formats.cache_reader import open_cache
from eaglecache.precompute.writer import PartWriter, create_or_check_cache
from eaglecache.target import target_config, weights_hash

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls

HIDDEN, VOCAB, LAYERS = 64, 512, 60
PREFIX = "language_model."
HEAD_NAMES = {"embed": PREFIX + "model.embed_tokens.weight", "norm": PREFIX + "model.norm.weight",
              "lm_head": PREFIX + "lm_head.weight"}
TEXT_CONFIG = {
    "model_type": "minimax_text", "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5, "rope_theta": 10_000_000.0, "max_position_embeddings": 32768, "hidden_act": "silu",
    "tie_word_embeddings": False,
}
VL_CONFIG = {
    "architectures": ["MiniMaxVL01ForConditionalGeneration"], "model_type": "minimax_vl_01",
    "text_config": TEXT_CONFIG, "image_token_index": 200025,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2},
}


def standin_tensors():
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)  # noqa: E731
    text = {HEAD_NAMES["embed"]: rand(VOCAB, HIDDEN), HEAD_NAMES["norm"]: 1 + 0.1 * rand(HIDDEN),
            HEAD_NAMES["lm_head"]: rand(VOCAB, HIDDEN)}
    for layer in (0, 1):
        for proj, shape in (("self_attn.q_proj", (64, HIDDEN)), ("mlp.up_proj", (128, HIDDEN))):
            text[f"{PREFIX}model.layers.{layer}.{proj}.weight"] = rand(*shape)
    vision = {f"vision_tower.encoder.layers.{i}.mlp.fc1.weight": rand(32, 32) for i in range(2)}
    projector = {"multi_modal_projector.linear_1.weight": rand(HIDDEN, 32), "image_newline": rand(HIDDEN)}
    return text, vision, projector


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(checkpoint dir, its tensors by name); shard 1 of 3 holds only vision tensors and is then destroyed."""
    root = tmp_path_factory.mktemp("minimax_standin") / "MiniMax-M3-standin"
    root.mkdir()
    text, vision, projector = standin_tensors()
    names = sorted(text)
    shards = [vision,  # vision only: poisoned below
              {n: text[n] for n in names[0::2]} | projector,  # text and vision tensors mixed, as in real shards
              {n: text[n] for n in names[1::2]}]
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(VL_CONFIG))
    vision_file = root / "model-00001-of-00003.safetensors"
    vision_file.write_bytes(b"\xff" * vision_file.stat().st_size)  # opening it now fails
    return root, text


@pytest.fixture
def tensor_reads(monkeypatch):
    """Every (file name, tensor name) read through safetensors.safe_open while the test runs."""
    reads = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, path, *args, **kwargs):
            self.name, self.handle = str(path).rsplit("/", 1)[-1], real(path, *args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            reads.append((self.name, name))
            return self.handle.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return reads


def test_head_tensors_are_read_by_name_under_the_prefix_and_nothing_else(standin, tensor_reads):
    from eaglecache.target import read_head_tensors
    from eaglecache.train.target_head import TargetHead

    root, text = standin
    head = TargetHead.from_target(root, PREFIX, torch.bfloat16)
    assert torch.equal(head.embed_weight, text[HEAD_NAMES["embed"]])
    assert torch.equal(head.norm_weight, text[HEAD_NAMES["norm"]])
    assert torch.equal(head.lm_head_weight, text[HEAD_NAMES["lm_head"]])
    assert head.eps == TEXT_CONFIG["rms_norm_eps"]  # from text_config, not the VL top level
    assert sorted(name for _, name in tensor_reads) == sorted(HEAD_NAMES.values())
    assert "model-00001-of-00003.safetensors" not in {file for file, _ in tensor_reads}

    tensor_reads.clear()  # the exporter's fallback for a run without its own norm: one tensor
    norm = read_head_tensors(root, PREFIX, ("norm",))["norm"]
    assert torch.equal(norm, text[HEAD_NAMES["norm"]]) and [name for _, name in tensor_reads] == [HEAD_NAMES["norm"]]
    with pytest.raises(UserError, match="weights_prefix"):
        TargetHead.from_target(root, "")  # the VL layout needs target.weights_prefix


def test_draft_config_for_vllm_comes_from_the_text_config(standin):
    from eaglecache.serve.export import draft_architecture, vllm_draft_config

    root, _ = standin
    assert target_config(root) == TEXT_CONFIG
    config = vllm_draft_config(draft_architecture(root), max_model_len=32768)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert (config["hidden_size"], config["target_hidden_size"]) == (HIDDEN, HIDDEN)
    assert config["vocab_size"] == config["draft_vocab_size"] == VOCAB
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rope_theta"] == TEXT_CONFIG["rope_theta"] and config["max_position_embeddings"] == 32768
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 30, 57]  # the seed's, as vLLM's default for 60 layers
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 30, 57]


def write_standin_cache(path, root, aux_layer_ids, num_samples=8, seed=0):
    """Random features of the stand-in's width, written by precompute's PartWriter (two parts)."""
    meta = {"aux_layer_ids": aux_layer_ids, "final_layer_id": LAYERS, "final_prenorm": True,
            "hidden_size": HIDDEN, "vocab_size": VOCAB, "num_hidden_layers": LAYERS,
            "target_weights_hash": weights_hash(root), "dataset_hash": "random-features", "dtype": "bfloat16",
            "codec": "zstd", "codec_level": 1, "chunk_tokens": 16, "shard_tokens": 64, "num_parts": 2}
    create_or_check_cache(path, meta)
    gen = torch.Generator().manual_seed(seed)
    for part in range(2):
        writer = PartWriter(path, part, 2, meta)
        for sid in range(part, num_samples, 2):
            n = int(torch.randint(10, 30, (1,), generator=gen))
            writer.add(sid, torch.randint(0, VOCAB, (n,), generator=gen).numpy().astype(np.int32),
                       (torch.rand(n, generator=gen) < 0.8).numpy().astype(np.uint8),
                       torch.randn(n, len(aux_layer_ids), HIDDEN, generator=gen).to(torch.bfloat16),
                       (3 * torch.randn(n, HIDDEN, generator=gen)).to(torch.bfloat16))
        writer.close()
    return path


def test_trains_with_the_minimax_config_from_a_standin_cache_and_exports(tmp_path, standin, tensor_reads,
                                                                        single_rank):
    from eaglecache.serve.export import export_run
    from eaglecache.train.main import train

    root, text = standin
    rank, world, device = single_rank
    config = load_config(PACKAGED_CONFIGS["minimax_m3"],
                         [f"target.path={root}", "train.global_batch_size=2", "train.max_seq_length=24",
                          "train.loss_chunk_tokens=16", "train.loader_workers=1", "train.checkpoint_interval=100",
                          "train.log_interval=1", "train.lr=3e-3", "train.warmup_ratio=0.0"])
    assert config.target.weights_prefix == PREFIX and config.precompute.aux_layer_ids == [2, 30, 57]
    assert config.train.ttt_length == 7 and config.train.gradient_checkpointing and config.train.dtype == "bfloat16"
    cache = open_cache(write_standin_cache(tmp_path / "cache", root, config.precompute.aux_layer_ids))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(config, run_dir, cache, target_dir=root, rank=rank, world_size=world, device=device)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 8 samples / global batch 2
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert sorted(name for _, name in tensor_reads) == sorted(HEAD_NAMES.values())  # nothing but the head

    exported = export_run(run_dir, tmp_path / "draft", root, PREFIX, config.target.max_model_len)
    vllm_config = json.loads((exported / "config.json").read_text())
    assert vllm_config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert vllm_config["eagle_aux_hidden_state_layer_ids"] == [2, 30, 57]
    assert (vllm_config["hidden_size"], vllm_config["vocab_size"]) == (HIDDEN, VOCAB)
    assert vllm_config["rope_theta"] == TEXT_CONFIG["rope_theta"]
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        fc = f.get_tensor("fc.weight")
    assert fc.shape == (HIDDEN, 3 * HIDDEN) and fc.dtype == torch.bfloat16
    assert "norm.weight" in names and not names & {"embed_tokens.weight", "lm_head.weight", "d2t"}  # shared
