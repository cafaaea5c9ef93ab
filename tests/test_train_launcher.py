"""`eaglecache train` through DeepSpeed's launcher: (c) 2 ranks x GA 1 == 1 rank x GA 2 in fp32 within 1e-6,
a run SIGKILLed after a checkpoint exits with 128 + 9 and resumes (at the step after that checkpoint) to the
uninterrupted run's exact weights, settings that cannot change the result do not block a resume, and bad
input is one error line with exit code 2.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_equivalence import TINY_RUN, feature_samples, fp32_weights, losses, write_feature_cache
from eaglecache.config import load_config
from eaglecache.errors import UserError
from eaglecache.formats.run import COMMIT, committed_steps, tag_of
from eaglecache.train.checkpoint import KILL_AFTER_CHECKPOINT_ENV, run_fingerprint
from eaglecache.train.launch import exit_status, remove_cpu_allreduce_buffers, signal_name, write_run_config

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


@pytest.fixture(scope="module")
def killed_one_rank(feature_cache, tmp_path_factory):
    """1 rank, SIGKILLed right after committing step 4 of 6: (its run directory, its completed process)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=1", env={KILL_AFTER_CHECKPOINT_ENV: "4"},
                              port=29565)
    return out, killed


def test_killed_after_a_checkpoint_resumes_to_the_same_weights(feature_cache, one_rank_run, killed_one_rank, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(killed_one_rank[0], out)
    killed = killed_one_rank[1]
    # the rank died of SIGKILL: the shell's 128 + 9, named, not DeepSpeed's truncated -9 (247)
    assert killed.returncode == 128 + signal.SIGKILL, killed.stderr[-3000:]
    assert "killed by SIGKILL" in killed.stderr.strip().splitlines()[-1]
    assert committed_steps(out) == [2, 4] and not (out / "final").exists()
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3, 4]
    resumed = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=1", port=29567)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trained 6/6 steps" in resumed.stdout
    # a resume, not a restart: it starts at step 5 and runs 5 and 6 only. The lines of steps 1-4 are the
    # killed run's, byte for byte: a rerun of those steps would have logged other tokens_per_s values
    assert "training 6 steps from step 4" in resumed.stderr + resumed.stdout
    now = (out / "metrics.jsonl").read_text().splitlines()
    assert now[:4] == logged and [json.loads(line)["step"] for line in now[4:]] == [5, 6]
    again, reference = fp32_weights(out), fp32_weights(one_rank_run)
    for name in reference:
        assert torch.equal(again[name], reference[name]), name
    assert losses(out) == losses(one_rank_run)  # every step logged once, with the same values
    assert (out / "final" / "model.safetensors").is_file()
    # DeepSpeed's CPU all-reduce buffers (70 MB per rank in RAM) of both runs, the killed one too, are gone
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_2956[57]_*"))


def _resumed_at_another_world_size(feature_cache, out, num_gpus, port):
    resumed = eaglecache_train(feature_cache, out, f"train.launcher.num_gpus={num_gpus}", port=port)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert "training 6 steps from step 4" in log and f"{num_gpus} rank(s) x GA {2 // num_gpus}" in log
    assert "resharding checkpoint step-0000004" in log and (out / "checkpoints" / "universal" / "step-0000004").is_dir()
    return resumed


def test_a_checkpoint_of_one_rank_resumes_on_two_ranks(feature_cache, one_rank_run, killed_one_rank, tmp_path):
    """1 rank x GA 2 for 4 steps, then 2 ranks x GA 1 from its checkpoint (DeepSpeed's universal checkpoint):
    the weights and losses of the uninterrupted 1-rank run, within the bound of 2 ranks == 1 rank above."""
    out = tmp_path / "resumed"
    shutil.copytree(killed_one_rank[0], out)
    _resumed_at_another_world_size(feature_cache, out, 2, 29569)
    resumed, reference = fp32_weights(out), fp32_weights(one_rank_run)
    assert max((resumed[name] - reference[name]).abs().max().item() for name in reference) <= 1e-6
    assert losses(out) == pytest.approx(losses(one_rank_run), rel=1e-5)
    assert losses(out)[:4] == losses(one_rank_run)[:4]  # the steps before the resume are the killed run's own


def test_a_checkpoint_of_two_ranks_resumes_on_one_rank(feature_cache, one_rank_run, tmp_path):
    out = tmp_path / "two-then-one"
    killed = eaglecache_train(feature_cache, out, "train.launcher.num_gpus=2", env={KILL_AFTER_CHECKPOINT_ENV: "4"},
                              port=29571)
    assert killed.returncode == 128 + signal.SIGKILL and committed_steps(out) == [2, 4], killed.stderr[-3000:]
    _resumed_at_another_world_size(feature_cache, out, 1, 29573)
    resumed, reference = fp32_weights(out), fp32_weights(one_rank_run)
    assert max((resumed[name] - reference[name]).abs().max().item() for name in reference) <= 1e-6
    assert losses(out) == pytest.approx(losses(one_rank_run), rel=1e-5)


def test_exit_status_of_a_killed_launcher_or_rank_is_128_plus_the_signal():
    assert exit_status(0) == 0 and exit_status(2) == 2 and exit_status(1) == 1
    assert exit_status(-signal.SIGKILL) == 137  # the launcher itself was killed
    assert exit_status(256 - signal.SIGKILL) == 137  # DeepSpeed's launch.py passed a rank's -9 to sys.exit
    assert exit_status(256 - signal.SIGTERM) == 143
    assert exit_status(137) == 137  # already the shell's convention (a rank run through a shell)
    assert signal_name(9) == "SIGKILL" and signal_name(signal.SIGRTMIN + 3) == f"signal {signal.SIGRTMIN + 3}"


def test_runtime_only_settings_do_not_refuse_a_resume(tmp_path):
    """Memory sizing, how vLLM runs the target (training never runs it) and launch/logging/checkpoint
    settings cannot change the weights: a run resumes with other values; what can change them is refused."""
    run_dir = tmp_path / "run"
    base = load_config(None, TINY_RUN)
    write_run_config(base, run_dir.mkdir() or run_dir)
    (run_dir / "checkpoints" / tag_of(2)).mkdir(parents=True)
    (run_dir / "checkpoints" / tag_of(2) / COMMIT).write_text("{}")
    for change in ("target.kv_cache_gib=2", "target.gpu_memory_utilization=0.5", "target.tensor_parallel_size=4",
                   "target.enforce_eager=true", "train.launcher.num_gpus=1", "train.log_interval=5",
                   "train.keep_checkpoints=4"):
        changed = load_config(None, TINY_RUN + [change])
        assert run_fingerprint(changed) == run_fingerprint(base), change
        write_run_config(changed, run_dir)  # accepted: the same command resumes
    started = load_config(run_dir / "config.yaml")
    for change, named in (("train.lr=1e-3", "train.lr=0.003"), ("target.weights_prefix=x.", "target.weights_prefix="),
                          ("train.ttt_length=2", "train.ttt_length=3"),
                          ("train.loss_mask_alignment=anchor", "train.loss_mask_alignment=predicted")):
        # the refusal names the setting and the value the run was started with
        with pytest.raises(UserError, match=rf"holds a run with other target/train settings \(it has {named}\)"):
            write_run_config(load_config(None, TINY_RUN + [change]), run_dir)
    assert load_config(run_dir / "config.yaml") == started  # a refused command changes nothing


@pytest.mark.parametrize("source", ["cache", "online"])
def test_aux_layers_the_features_lack_are_one_error_line_before_any_rank_starts(source, request, tmp_path):
    """The cache stores layers [2, 4, 5]; the online source computes precompute.aux_layer_ids, by default
    vLLM's (2, L//2, L-3) = [2, 4, 5] of the 8-layer tiny target."""
    if source == "cache":
        result = eaglecache_train(request.getfixturevalue("feature_cache"), tmp_path / "run",
                                  "train.draft.aux_layer_ids=[1,2]", port=29569)
    else:
        cmd = [sys.executable, "-m", "eaglecache.cli", "train", "--data", str(request.getfixturevalue("tiny_dataset")),
               "--output", str(tmp_path / "run"), *TINY_RUN, "train.source=online", "train.draft.aux_layer_ids=[1,2]"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "layers [1] are not in the features" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "deepspeed.launcher" not in result.stderr


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


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def sigterm_after_a_checkpoint(cmd: list[str], run_dir: Path, watched: Path) -> tuple[int, str]:
    """Start ``cmd``; once ``run_dir`` has a committed checkpoint, SIGTERM its process only, as `kill PID` or a
    supervisor does. Returns (exit code, stderr); ``watched`` (a path in every process's command line) shows
    the launcher and ranks were running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not committed_steps(run_dir) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None and committed_steps(run_dir), "no checkpoint before the deadline"
        assert len(processes_mentioning(str(watched))) >= 3  # the CLI, DeepSpeed's runner and launcher, the ranks
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


def test_sigterm_to_the_train_command_stops_every_rank(feature_cache, tmp_path):
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(feature_cache), "--output", str(out),
           *TINY_RUN, "train.epochs=1000", "train.max_steps=4000", "train.launcher.master_port=29563"]
    returncode, stderr = sigterm_after_a_checkpoint(cmd, out, out)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; run the same command again")
    time.sleep(2)  # the runner's SIGKILLs land
    assert processes_mentioning(str(out)) == [], "a launcher or rank outlived the stopped command"
    assert committed_steps(out)  # what the rerun resumes from (the SIGKILL test above checks a resume)
