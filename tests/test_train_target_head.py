"""The frozen target head is read by tensor name: only the three tensors, under a prefix, from shards."""

import json

import pytest
import torch
from safetensors.torch import save_file

from eaglecache.errors import UserError
from eaglecache.train.target_head import TargetHead, read_target_head

H, V = 8, 20


def write_target(path, tensors, config=None, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"hidden_size": H, "vocab_size": V,
                                                            "num_hidden_layers": 8, "rms_norm_eps": 1e-5}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def head_tensors(prefix=""):
    gen = torch.Generator().manual_seed(0)
    return {f"{prefix}model.embed_tokens.weight": torch.randn(V, H, generator=gen),
            f"{prefix}model.norm.weight": torch.rand(H, generator=gen),
            f"{prefix}lm_head.weight": torch.randn(V, H, generator=gen),
            f"{prefix}model.layers.0.mlp.up_proj.weight": torch.randn(4, H, generator=gen)}


def test_reads_the_three_tensors_under_a_prefix_from_a_sharded_checkpoint(tmp_path):
    tensors = head_tensors("language_model.")
    write_target(tmp_path / "t", tensors, shards=3)
    head = read_target_head(tmp_path / "t", "language_model.")
    assert set(head) == {"embed", "norm", "lm_head"}
    assert torch.equal(head["embed"], tensors["language_model.model.embed_tokens.weight"])
    assert torch.equal(head["norm"], tensors["language_model.model.norm.weight"])
    assert torch.equal(head["lm_head"], tensors["language_model.lm_head.weight"])
    with pytest.raises(UserError, match="weights_prefix"):
        read_target_head(tmp_path / "t", "")


def test_tied_embeddings_share_one_buffer_and_untied_missing_head_is_an_error(tmp_path):
    tensors = {k: v for k, v in head_tensors().items() if not k.startswith("lm_head")}
    write_target(tmp_path / "tied", tensors, {"hidden_size": H, "vocab_size": V, "num_hidden_layers": 8,
                                              "tie_word_embeddings": True, "rms_norm_eps": 1e-5})
    head = TargetHead.from_target(tmp_path / "tied", dtype=torch.bfloat16)
    assert head.lm_head_weight.data_ptr() == head.embed_weight.data_ptr()
    assert head.embed_weight.dtype == torch.bfloat16 and head.vocab_size == V
    assert not list(head.parameters()) and not head.state_dict()  # buffers, never saved
    write_target(tmp_path / "untied", tensors)
    with pytest.raises(UserError, match="lm_head"):
        read_target_head(tmp_path / "untied")


def test_final_norm_is_the_targets_rmsnorm(tmp_path):
    tensors = head_tensors()
    write_target(tmp_path / "t", tensors)
    head = TargetHead.from_target(tmp_path / "t")
    x = torch.randn(3, H)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * tensors["model.norm.weight"]
    assert torch.allclose(head.final_norm(x), expected, atol=1e-6)
    assert torch.equal(head.embed(torch.tensor([3])), tensors["model.embed_tokens.weight"][3:4])
