"""train.source=online on the tiny target: the features are the cache's (pre-norm final state included),
(b) training from the vLLM cache and online gives loss curves within 1 % at every logged step, and the
draft's simulated accept length rises well above the untrained draft's (the curve is in the run's
TensorBoard events).

Uses the shared ``tiny_dataset`` / ``tiny_cache`` fixtures (48 ShareGPT conversations through
`data prepare` and `precompute`, i.e. through vLLM) and trains in this process (world size 1).
"""

import json

import numpy as np
import pytest
import torch

from eaglecache.config import load_config
from eaglecache.dtypes import TORCH_DTYPES
from eaglecache.formats.cache_reader import open_cache

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

RUN = ["train.dtype=float32", "train.global_batch_size=4", "train.micro_batch_size=1", "train.ttt_length=3",
       "train.warmup_ratio=0.0", "train.log_interval=1", "train.checkpoint_interval=1000", "train.loader_workers=1"]


@pytest.fixture(scope="module")
def online(tiny_dataset, tiny_target):
    from eaglecache.train.online import OnlineFeatures

    return OnlineFeatures(tiny_dataset, tiny_target, load_config(None), torch.device("cpu"))


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_online_features_are_the_caches(online, tiny_cache, tiny_target):
    from transformers import AutoModelForCausalLM

    cache = open_cache(tiny_cache)
    assert online.metadata["aux_layer_ids"] == cache.metadata["aux_layer_ids"]
    assert list(online.sample_ids) == list(cache.sample_ids)
    compute_dtype = load_config().target.compute_dtype()
    assert online.metadata["compute_dtype"] == compute_dtype == cache.metadata["compute_dtype"]
    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=TORCH_DTYPES[compute_dtype]).eval()
    for sample_id in cache.sample_ids[:4]:
        live, stored = online.read(sample_id), cache.read(sample_id)
        assert np.array_equal(live.input_ids, stored.input_ids) and np.array_equal(live.loss_mask, stored.loss_mask)
        with torch.no_grad():
            last = model(torch.from_numpy(live.input_ids.astype(np.int64))[None],
                         output_hidden_states=True).hidden_states[-1][0]
            assert torch.allclose(model.model.norm(live.final[None])[0].float(), last.float(), atol=0.05, rtol=0.02)
        for got, ref in ((live.aux, stored.aux), (live.final, stored.final)):  # transformers vs vLLM, stored as bf16
            got, ref = got.float(), ref.float()
            assert (got - ref).norm() <= 0.02 * ref.norm(), sample_id


def test_cache_and_online_loss_curves_agree_within_one_percent(online, tiny_cache, tiny_target, tmp_path,
                                                               single_rank):
    from eaglecache.train.main import train

    rank, world, device = single_rank
    config = load_config(None, RUN + ["train.max_steps=8", "train.lr=1e-3"])
    curves = {}
    for name, source in (("cache", open_cache(tiny_cache)), ("online", online)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        train(config, run_dir, source, target_dir=tiny_target, rank=rank, world_size=world, device=device)
        curves[name] = [r["loss"] for r in records(run_dir)]
    assert len(curves["cache"]) == len(curves["online"]) == 8
    gaps = [abs(a - b) / abs(a) for a, b in zip(curves["cache"], curves["online"])]
    print(f"cache vs online: largest relative loss gap {max(gaps):.3%} over {len(gaps)} steps")
    for step, (a, b) in enumerate(zip(curves["cache"], curves["online"]), start=1):
        assert abs(a - b) <= 0.01 * abs(a), (step, a, b)
    assert curves["cache"][-1] < curves["cache"][0]


def test_training_raises_the_simulated_accept_length(tiny_cache, tiny_target, tmp_path, single_rank):
    """160 steps of 2 sequences (10 epochs of the 33 cached conversations, about a minute on one core)."""
    from eaglecache.train.main import train

    rank, world, device = single_rank
    config = load_config(None, RUN + ["train.global_batch_size=2", "train.epochs=10", "train.lr=3e-3"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(config, run_dir, open_cache(tiny_cache), target_dir=tiny_target, rank=rank, world_size=world,
          device=device)
    curve = [r["accept_len_3"] for r in records(run_dir)]
    untrained = curve[0]  # DeepSpeed's warmup runs step 1 at lr 0: the draft as initialised
    trained = sum(curve[-16:]) / 16
    print(f"simulated accept length (3 tokens): untrained {untrained:.3f}, last 16 steps {trained:.3f}")
    assert untrained < 1.2  # the untrained draft predicts almost nothing
    assert trained >= untrained + 0.4, (untrained, trained)
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
