"""Shared fixtures (the embedded tiny target, built once per cache key; the default config; a data set and
its cache; one vLLM engine of the target alone and one precompute engine, each started once per session;
one torch.distributed rank) and the helpers several test files use (random features, a
cache written by precompute's own writer): ``from conftest import ...``."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Spinning OpenMP threads made torch 3-4x slower on the shared 2-core CPU; passive waiting
# (set before torch loads its OpenMP runtime) is inherited by vLLM and DeepSpeed children too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target():
    """Path of the built tiny target (HF format); built on first use, then cached on disk."""
    from eaglecache.tiny_target.build import ensure_tiny_target

    return ensure_tiny_target()


@pytest.fixture(scope="session")
def tiny_config():
    """configs/tiny.yaml, the CPU default config."""
    from eaglecache.config import load_config

    return load_config(None)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_target, tmp_path_factory):
    """A prepared data set of 48 real ShareGPT conversations (first exchange each), through `data prepare`."""
    import json

    from eaglecache.cli import main
    from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages

    root = tmp_path_factory.mktemp("tiny_dataset")
    lines = []
    for _, record in iter_sharegpt(sharegpt_path()):
        try:
            messages = sharegpt_to_messages(record)
        except ValueError:
            continue
        if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
            lines.append(json.dumps({"messages": messages[:2]}))
        if len(lines) == 48:
            break
    (root / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "prepare", "--input", str(root / "conversations.jsonl"), "--output", str(root / "data"),
                 f"target.path={tiny_target}", "data.max_seq_length=256"]) == 0
    return root / "data"


TARGET_ENGINE_OVERRIDES = ["target.dtype=float32"]  # transformers' reference runs in float32 too


@pytest.fixture(scope="session")
def target_engine(tiny_target):
    """One vLLM engine of the tiny target alone (float32, configs/tiny.yaml's other vLLM settings) for every
    module that only needs the target: its own checks, regeneration, the greedy reference of the drafts."""
    from eaglecache.config import load_config
    from eaglecache.data.regenerate import make_engine

    llm = make_engine(load_config(None, [f"target.path={tiny_target}", *TARGET_ENGINE_OVERRIDES]), tiny_target)
    yield llm
    llm.llm_engine.engine_core.shutdown()


PRECOMPUTE_ENGINE_OVERRIDES = ["target.kv_cache_gib=0.25"]


@pytest.fixture(scope="session")
def precompute_engine(tiny_target):
    """One precompute engine (the tiny target with hidden-state extraction of the default aux layers) for
    the session's cache and test_precompute; what it writes where is set per run by ``run_precompute``."""
    from eaglecache.config import load_config
    from eaglecache.precompute.run import resolve_layers
    from eaglecache.precompute.vllm_engine import build_engine

    config = load_config(None, [f"target.path={tiny_target}", *PRECOMPUTE_ENGINE_OVERRIDES])
    aux_layer_ids, num_layers = resolve_layers(config, tiny_target)
    llm = build_engine(config, tiny_target, aux_layer_ids=aux_layer_ids, num_layers=num_layers)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def tiny_cache(tiny_target, tiny_dataset, precompute_engine, tmp_path_factory):
    """The feature cache of ``tiny_dataset``, written by `eaglecache precompute`'s own run through vLLM."""
    from eaglecache.config import load_config
    from eaglecache.precompute.run import run_precompute

    cache = tmp_path_factory.mktemp("tiny_cache") / "cache"
    config = load_config(None, [f"target.path={tiny_target}", *PRECOMPUTE_ENGINE_OVERRIDES,
                                "precompute.shard_tokens=4096", "precompute.chunk_tokens=256"])
    assert run_precompute(config, data=tiny_dataset, output=cache, llm=precompute_engine) == 0
    return cache


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed (gloo, world size 1) in this process, one thread, for the whole session.

    Session-scoped because DeepSpeed caches its world group at module level: a second process group
    created in the same interpreter after a teardown meets that stale group ("group is not registered").
    """
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin
    from eaglecache.train.deepspeed_engine import init_distributed

    yield init_distributed()
    torch.set_num_threads(threads)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def random_feature_samples(num, *, hidden, vocab, num_aux=3, seed=0, min_len=5, max_len=30, final_scale=1.0):
    """``num`` samples of random token ids, loss masks and bf16 states of width ``hidden`` (ids 0..num-1)."""
    import numpy as np
    import torch

    from eaglecache.formats.cache_reader import Sample

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for sid in range(num):
        n = int(torch.randint(min_len, max_len, (1,), generator=gen))
        samples.append(Sample(
            input_ids=torch.randint(0, vocab, (n,), generator=gen).numpy().astype(np.int32),
            loss_mask=(torch.rand(n, generator=gen) < 0.8).numpy().astype(np.uint8),
            aux=torch.randn(n, num_aux, hidden, generator=gen).to(torch.bfloat16),
            final=(final_scale * torch.randn(n, hidden, generator=gen)).to(torch.bfloat16), sample_id=sid))
    return samples


def write_cache_parts(path, samples, meta):
    """A real Zarr cache at ``path`` (precompute's writer) holding ``samples``, split evenly over
    ``meta["num_parts"]`` parts."""
    from eaglecache.precompute.writer import PartWriter, create_or_check_cache

    num_parts = meta["num_parts"]
    create_or_check_cache(path, meta)
    per_part = -(-len(samples) // num_parts)
    for part in range(num_parts):
        writer = PartWriter(path, part, num_parts, meta)
        for s in samples[part * per_part:(part + 1) * per_part]:
            writer.add(s.sample_id, s.input_ids, s.loss_mask, s.aux, s.final)
        writer.close()
    return path


def reference_rms(x, weight, eps):
    """RMSNorm written out, for the plain-loop references of the losses."""
    import torch

    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_rope(x, position, theta):
    """RoPE of x [heads, d] at one position, rotate-half style, angles in fp32 as HF and vLLM compute them."""
    import torch

    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angle = float(position) * inv
    cos = torch.cat([angle.cos(), angle.cos()]).to(x.dtype)
    sin = torch.cat([angle.sin(), angle.sin()]).to(x.dtype)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


@pytest.fixture(scope="session")
def two_rank_run(tiny_target, tiny_cache, tmp_path_factory):
    """test_slurm's TRAIN through `eaglecache train` on 2 CPU ranks of this machine, one thread each: the run
    that the Slurm job scripts and the two-node launches (tests/test_cluster.py) must equal."""
    import subprocess
    import sys

    from test_slurm import TRAIN

    out = tmp_path_factory.mktemp("two-rank-run") / "run"
    result = subprocess.run([sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(tiny_cache), "--output",
                             str(out), f"target.path={tiny_target}", "train.launcher.num_gpus=2", *TRAIN],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out
