"""Training under faults resumes to the uninterrupted run's exact weights.

A damaged newest checkpoint (flipped byte) and a half-written one (no COMMIT) are
skipped with a warning naming them; a checkpoint save that fills the disk (a small
tmpfs) stops with one error naming the path and the bytes needed, keeps the
checkpoint before it, and the run resumes once space is freed; a run SIGKILLed at
two random points (seeded, printed: mid-step or mid-save) and restarted ends with
the same weights and metrics. World size 1, on random features of the tiny
target's width: in-process (the shared ``single_rank``) except the killed runs,
which are ``python -m eaglecache.train.main`` subprocesses like their reference.
SIGKILL right after a checkpoint through the launcher is in test_train_launcher.py.
Every resume is checked to be one: it starts at the step after the newest intact
checkpoint and runs only the steps after it (``assert_resumed_at``); a run that
ignored its checkpoints would still end with the same weights on CPU.
"""

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eaglecache.config import load_config
from eaglecache.errors import UserError
from eaglecache.formats.cache_reader import open_cache
from eaglecache.formats.run import COMMIT, committed_steps, tag_of
from eaglecache.train.checkpoint import _file_checksums, checkpoint_problem
from test_train_equivalence import TINY_RUN, feature_samples, fp32_weights, losses, write_feature_cache

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's torch.distributed calls
RUN = TINY_RUN + ["train.keep_checkpoints=3"]  # steps 2, 4, 6 all kept; not part of the run's fingerprint


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_target):
    path = tmp_path_factory.mktemp("faults-train") / "cache"
    return open_cache(write_feature_cache(path, feature_samples(tiny_target, num=12), tiny_target))


def train_into(run_dir, source, tiny_target, single_rank):
    from eaglecache.train.main import train

    rank, world, device = single_rank
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(load_config(None, RUN), run_dir, source, target_dir=tiny_target, rank=rank, world_size=world,
                 device=device)


@pytest.fixture(scope="module")
def reference(source, tiny_target, single_rank, tmp_path_factory):
    """The uninterrupted run: 6 steps, checkpoints at 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_into(run_dir, source, tiny_target, single_rank)
    assert committed_steps(run_dir) == [2, 4, 6]
    return run_dir


def assert_same_run(run_dir, reference):
    got, want = fp32_weights(run_dir), fp32_weights(reference)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert losses(run_dir) == losses(reference)


def metrics_lines(run_dir) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def assert_resumed_at(run_dir, log_text: str, start: int, before: list[str], total: int = 6):
    """A resume, not a restart: the run says it starts after step ``start``, the metrics lines of steps
    1..start are the earlier run's byte for byte (a rerun of those steps would log other tokens_per_s
    and data_wait_fraction values), and it logged each of the steps start+1..total once."""
    now = metrics_lines(run_dir)
    assert len(before) >= start and now[:start] == before[:start], "the steps before the checkpoint ran again"
    assert [json.loads(line)["step"] for line in now] == list(range(1, total + 1))
    assert f"training {total} steps from step {start}:" in log_text, log_text[-3000:]


def test_checkpoint_problem_names_a_flipped_truncated_or_missing_file(tmp_path):
    files = {"a.pt": bytes(range(256)) * 40, "sub/b.pt": b"x" * 5000}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / COMMIT).write_text(json.dumps({"step": 2, "files": _file_checksums(tmp_path)}))
    assert checkpoint_problem(tmp_path) is None
    data = bytearray(files["a.pt"])
    data[1234] ^= 1
    (tmp_path / "a.pt").write_bytes(bytes(data))
    assert checkpoint_problem(tmp_path) == "a.pt fails its checksum"
    (tmp_path / "a.pt").write_bytes(files["a.pt"][:100])
    assert "a.pt has 100 bytes" in checkpoint_problem(tmp_path)
    (tmp_path / "a.pt").write_bytes(files["a.pt"])
    (tmp_path / "sub" / "b.pt").unlink()
    assert checkpoint_problem(tmp_path) == "sub/b.pt is missing"
    (tmp_path / COMMIT).write_text("{half")
    assert "unreadable COMMIT" in checkpoint_problem(tmp_path)


def test_damaged_and_half_written_checkpoints_are_skipped_with_a_warning(reference, source, tiny_target,
                                                                         single_rank, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "checkpoints" / tag_of(6) / COMMIT).unlink()  # killed while saving step 6
    damaged = run_dir / "checkpoints" / tag_of(4)
    victim = max((p for p in damaged.rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern somewhere in the optimizer or model states
    victim.write_bytes(bytes(data))

    before = metrics_lines(run_dir)
    with caplog.at_level(logging.INFO, logger="eaglecache.train"):
        train_into(run_dir, source, tiny_target, single_rank)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and victim.name in warnings[0], warnings
    assert_resumed_at(run_dir, caplog.text, 2, before)
    assert_same_run(run_dir, reference)  # resumed from step 2, retrained 3..6 exactly


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs (unmounted afterwards); skips when this machine does not allow mounting one."""
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted: {mounted.stderr.strip()}")
    yield root
    subprocess.run(["umount", "-l", str(root)], capture_output=True)


def resize(root, size_bytes):
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(root)], check=True, capture_output=True)


def test_disk_full_at_a_checkpoint_is_one_error_and_resume_after_freeing_space_is_exact(
        reference, source, tiny_target, single_rank, small_disk, caplog):
    checkpoint_bytes = sum(f.stat().st_size for f in (reference / "checkpoints" / tag_of(2)).rglob("*")
                           if f.is_file())
    resize(small_disk, int(checkpoint_bytes * 1.5) + (1 << 20))  # one checkpoint fits, the second does not
    run_dir = small_disk / "run"
    with pytest.raises(UserError) as error:
        train_into(run_dir, source, tiny_target, single_rank)
    message = str(error.value)
    assert message.startswith(f"disk full writing checkpoint {run_dir / 'checkpoints' / tag_of(4)}: it needs about ")
    assert "bytes" in message and "are free" in message and f"checkpoint {tag_of(2)} is intact" in message
    assert "\n" not in message
    assert committed_steps(run_dir) == [2] and not (run_dir / "checkpoints" / tag_of(4)).exists()
    assert checkpoint_problem(run_dir / "checkpoints" / tag_of(2)) is None

    resize(small_disk, 4 * checkpoint_bytes + (4 << 20))  # space freed: the same command resumes
    before = metrics_lines(run_dir)
    with caplog.at_level(logging.INFO, logger="eaglecache.train"):
        train_into(run_dir, source, tiny_target, single_rank)
    assert_resumed_at(run_dir, caplog.text, 2, before)
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("overrides, change, message", [
    ([], {"hidden_size": 999}, "does not match the features"),
    ([], {"vocab_size": 7}, "does not match the features"),
    (["train.draft.aux_layer_ids=[1,2,3]"], {}, "are not in the features"),
])
def test_features_that_do_not_fit_the_target_or_config_are_refused(source, tiny_target, overrides, change, message):
    from eaglecache.train.main import build_draft

    with pytest.raises(UserError, match=message):
        build_draft(load_config(None, RUN + overrides), tiny_target, {**source.metadata, **change}, None,
                    torch.float32)


def test_resuming_a_run_on_other_features_is_refused(reference, source, tmp_path):
    from eaglecache.train.checkpoint import run_fingerprint, write_run_json
    from eaglecache.train.main import source_fingerprint

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    other = {**source_fingerprint(source), "dataset_hash": "another data set"}
    with pytest.raises(UserError, match="holds a run with another source"):
        write_run_json(run_dir, source_fingerprint=other, world_size=1, total_steps=run["total_steps"],
                       config_hash=run_fingerprint(load_config(None, RUN)))


def start_training(run_dir, cache, log):
    """One rank of `python -m eaglecache.train.main` on its own (what the launcher starts per rank)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eaglecache.train.main", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir),
           "--cache", str(cache), *RUN]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parent.parent, env=env)


def last_logged_step(run_dir, since: float) -> int:
    """The last step in metrics.jsonl once this run has written it (a resumed run first drops what the
    killed one logged after its checkpoint), else 0."""
    path = run_dir / "metrics.jsonl"
    try:
        if path.stat().st_mtime < since:
            return 0
        lines = path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_at_random_steps_then_restart_gives_the_same_weights(source, tmp_path):
    seed = int(os.environ.get("EAGLECACHE_FAULT_SEED", "7"))
    rng = random.Random(seed)
    first = rng.randint(1, 3)
    points = [(first, round(rng.uniform(0, 0.1), 3)), (rng.randint(first + 1, 5), round(rng.uniform(0, 0.1), 3))]
    print(f"\ntraining kill points (seed {seed}): after step N is logged + jitter s: {points}")
    reference = tmp_path / "reference"
    assert start_training(reference, source.path, tmp_path / "reference.log").wait(timeout=600) == 0, \
        (tmp_path / "reference.log").read_text()[-3000:]
    run_dir = tmp_path / "killed"
    starts = []  # (log, the newest checkpoint it should resume from, metrics lines before it started)
    for i, (step, jitter) in enumerate(points):
        started = time.time()
        starts.append((tmp_path / f"killed-{i}.log", (committed_steps(run_dir) or [0])[-1], metrics_lines(run_dir)))
        proc = start_training(run_dir, source.path, tmp_path / f"killed-{i}.log")
        deadline = time.monotonic() + 600
        while last_logged_step(run_dir, started) < step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(jitter)
        assert proc.poll() is None, f"the run ended before its kill point {step}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        print(f"killed after step {last_logged_step(run_dir, started)} was logged; "
              f"committed checkpoints {committed_steps(run_dir)}")
    assert not (run_dir / "final").exists()
    resume_from, before = (committed_steps(run_dir) or [0])[-1], metrics_lines(run_dir)
    final = start_training(run_dir, source.path, tmp_path / "final.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert_resumed_at(run_dir, (tmp_path / "final.log").read_text(), resume_from, before)
    for log, start, _ in starts:  # the killed runs too started at their newest checkpoint
        assert f"training 6 steps from step {start}:" in log.read_text(), log.read_text()[-3000:]
    assert_same_run(run_dir, reference)
