"""Every draft family trains through the real trainer (DeepSpeed ZeRO-3, world size 1, gloo on CPU), resumes
exactly from a checkpoint, and exports in the layout vLLM loads for it.

The features are random, of the tiny target's width (the trainer only needs their shapes); that vLLM's
forward on an exported draft equals the trainer's is tests/test_vllm_draft_forward.py's job.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import random_feature_samples
from eaglecache.config import load_config
from eaglecache.formats.draft import DraftArch, tensor_shapes
from eaglecache.formats.run import committed_steps, tag_of
from eaglecache.target import target_config
from eaglecache.train.loader import InMemoryFeatures

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls

RUN = ["train.dtype=float32", "train.global_batch_size=2", "train.micro_batch_size=1", "train.max_seq_length=32",
       "train.ttt_length=3", "train.lr=3e-3", "train.warmup_ratio=0.0", "train.log_interval=1",
       "train.checkpoint_interval=2", "train.loader_workers=1", "train.epochs=1"]
FAMILIES = {"eagle3.1": ["train.draft.aux_norm=per_layer"], "peagle": ["train.draft.num_layers=2"],
            "dflash": ["train.draft.num_layers=2"]}


def _weights(run_dir, step):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag_of(step))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_resumes_exactly_and_exports(family, tmp_path, tiny_target, single_rank):
    from eaglecache.serve.export import export_run
    from eaglecache.train.main import train

    rank, world, device = single_rank
    cfg = target_config(tiny_target)
    samples = random_feature_samples(8, hidden=cfg["hidden_size"], vocab=cfg["vocab_size"], seed=0, min_len=12,
                                     max_len=40, final_scale=3)
    source = InMemoryFeatures(samples, {"aux_layer_ids": [2, 4, 5], "hidden_size": cfg["hidden_size"],
                                        "vocab_size": cfg["vocab_size"]})
    config = load_config(None, RUN + [f"train.draft.family={family}"] + FAMILIES[family])
    run = tmp_path / "run"
    run.mkdir()
    train(config, run, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
    assert committed_steps(run) == [2, 4]
    arch = DraftArch.from_json(json.loads((run / "final" / "draft.json").read_text()))
    assert arch.family == family
    final, first = _weights(run, 4), _weights(run, 2)
    assert set(final) == set(tensor_shapes(arch))  # every family tensor is trained and checkpointed
    moved = {n for n in final if (final[n] - first[n]).abs().max() > 1e-4}
    assert {"fc.weight", "norm.weight"} <= moved and (family != "peagle" or "mask_hidden" in moved), moved

    # resume from step 2 after losing everything later: the same weights, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_of(4))
    shutil.rmtree(resumed / "final")
    train(config, resumed, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
    again = _weights(resumed, 4)
    assert all(torch.equal(final[n], again[n]) for n in final)

    draft_dir = export_run(run, tmp_path / "draft", tiny_target)
    vllm_config = json.loads((draft_dir / "config.json").read_text())
    with safe_open(str(draft_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names == set(tensor_shapes(arch))
    if family == "dflash":
        assert vllm_config["architectures"] == ["DFlashDraftModel"] and vllm_config["num_hidden_layers"] == 2
        assert vllm_config["dflash_config"]["target_layer_ids"] == [1, 3, 4]  # vLLM's aux ids - 1
    else:
        assert vllm_config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert vllm_config.get("fc_norm") is (True if family == "eagle3.1" else None)
        assert vllm_config.get("norm_output") is (True if family == "eagle3.1" else None)
        assert (vllm_config.get("mask_token_id") is not None) == (family == "peagle")
        assert vllm_config["num_hidden_layers"] == (2 if family == "peagle" else 1)
        assert (family == "peagle") == ("layers.1.self_attn.q_proj.weight" in names)
    card = (draft_dir / "README.md").read_text()
    assert {"eagle3.1": "EAGLE 3.1", "peagle": "P-EAGLE", "dflash": "DFlash"}[family] in card.splitlines()[0]
