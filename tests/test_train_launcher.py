"""`eaglecache train` through DeepSpeed's launcher: (c) 2 ranks x GA 1 == 1 rank x GA 2 in fp32 within 1e-6,
a run SIGKILLed after a checkpoint resumes to the uninterrupted run's exact weights, and bad input is one
error line with exit code 2.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_equivalence import TINY_RUN, feature_samples, fp32_weights, losses, write_feature_cache
from eaglecache.train.checkpoint import KILL_AFTER_CHECKPOINT_ENV, committed_steps
from eaglecache.train.launch import remove_cpu_allreduce_buffers

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
REPO = Path(__file__).resolve().parent.parent


def eaglecache_train(cache, output, *overrides, env=None, port=29561):
    cmd = [sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(cache), "--output", str(output),
           *TINY_RUN, f"train.launcher.master_port={port}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory, tiny_target):
    path = tmp_path_factory.mktemp("train-launcher") / "cache"
    return write_feature_cache(path, feature_samples(tiny_target, num=12), tiny_target)


@pytest.fixture(scope="module")
def one_rank_run(feature_cache, tmp_path_factory):
    """1 rank, gradient accumulation 2, uninterrupted: the reference of both tests."""
    out = tmp_path_factory.mktemp("one-rank") / "run"
    result = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 6/6 steps" in result.stdout
    return out


def test_two_ranks_ga1_equal_one_rank_ga2(feature_cache, one_rank_run, tmp_path):
    """The 2-rank run starts the training module under DeepSpeed's launcher directly (--config)."""
    out = tmp_path / "two-ranks"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29563",
           "--module", "eaglecache.train.main", "--config", "configs/tiny.yaml", "--run-dir", str(out),
           "--cache", str(feature_cache), *TINY_RUN]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                                env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    finally:
        remove_cpu_allreduce_buffers(29563)  # what `eaglecache train` does after its launcher returns
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s) x GA 1" in result.stderr + result.stdout
    two, one = fp32_weights(out), fp32_weights(one_rank_run)
    assert set(two) == set(one)
    worst = max((two[name] - one[name]).abs().max().item() for name in one)
    assert worst <= 1e-6, worst
    earlier = fp32_weights(one_rank_run, step=4)
    assert max((one[name] - earlier[name]).abs().max().item() for name in one) > 1e-3  # 1e-6 is a tight bound
    assert losses(out) == pytest.approx(losses(one_rank_run), rel=1e-5)


def test_killed_after_a_checkpoint_resumes_to_the_same_weights(feature_cache, one_rank_run, tmp_path):
    out = tmp_path / "killed"
    killed = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=1", env={KILL_AFTER_CHECKPOINT_ENV: "4"},
                              port=29565)
    assert killed.returncode != 0
    assert committed_steps(out) == [2, 4] and not (out / "final").exists()
    resumed = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=1", port=29567)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained 6/6 steps" in resumed.stdout
    again, reference = fp32_weights(out), fp32_weights(one_rank_run)
    for name in reference:
        assert torch.equal(again[name], reference[name]), name
    assert losses(out) == losses(one_rank_run)  # every step logged once, with the same values
    assert (out / "final" / "model.safetensors").is_file()
    # DeepSpeed's CPU all-reduce buffers (70 MB per rank in RAM) of both runs, the killed one too, are gone
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_2956[57]_*"))


@pytest.mark.parametrize("args, message", [
    (["--cache", "/nonexistent/cache"], "no cache.json"),
    ([], "needs --cache"),
    (["train.source=online"], "needs --data"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    cmd = [sys.executable, "-m", "eaglecache.cli", "train", "--output", str(tmp_path / "run"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
