"""The MiniMax-M3 Slurm job scripts under a real single-node Slurm (scripts/slurm.sh starts it).

sbatch runs a copy of a job script from slurmd's spool directory, with the submitting shell's
environment: these tests submit configs/minimax_m3/*.sbatch as a user would (the tiny config, the
resources scaled down on sbatch's command line), kill a running job with SIGKILL, requeue it with
`scontrol requeue`, and check that what the requeued job finishes equals an uninterrupted run and that
it resumed instead of starting over. The precompute array runs on two nodes, in tests/test_cluster.py, which
uses the helpers here.
"""

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from test_train_equivalence import TINY_RUN, fp32_weights, losses
from eaglecache.formats.cache import PART_FILE, part_dir
from eaglecache.formats.cache_reader import open_cache
from eaglecache.formats.run import committed_steps

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "configs" / "minimax_m3"
# small shards: a dozen commit points per part, so a task can be killed between two of them
SHARDS = ["precompute.shard_tokens=256", "precompute.chunk_tokens=64"]
# whole samples (TINY_RUN's 32 tokens would keep only the prompts, which carry no loss)
TRAIN = [*TINY_RUN, "train.max_seq_length=256", "train.checkpoint_interval=4", "train.keep_checkpoints=8"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm, installed (apt) and started by the project's own script."""
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sh")], capture_output=True, text=True,
                            timeout=900)
    if result.returncode == 3:  # the one reason not to run: the packages cannot be fetched
        pytest.skip(f"Slurm is not installed and cannot be: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr


def job_env(**values) -> dict[str, str]:
    """The submitting shell's environment (sbatch passes it on to the job) plus the job script's variables."""
    env = {**os.environ, "CONFIG": "tiny", "OMP_NUM_THREADS": "1"}  # a config packaged with eaglecache, by name
    env.update({k: str(v) for k, v in values.items()})
    return env


def sbatch(script: Path, options: list[str], args: list[str], env: dict, cwd: Path) -> str:
    result = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def tasks(job: str) -> dict[str, dict[str, str]]:
    """{array task id ('' for a plain job): scontrol's fields} of every task of ``job``."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60).stdout
    result = {}
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        result[fields.get("ArrayTaskId", "")] = fields
    return result


def wait_for(condition, what: str, timeout_s: float, logs: Path):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{job_logs(logs)}")
        time.sleep(0.1)
    return value


def job_logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(directory.glob("*.out")))


def state(job: str, task: str = "") -> str:
    return tasks(job).get(task, {}).get("JobState", "")


def kill_and_requeue(job: str, task: str, logs: Path) -> None:
    """What a node failure or an admin's kill does to a running task, then `scontrol requeue` of it."""
    name = f"{job}_{task}" if task else job
    assert subprocess.run(["scancel", "--signal=KILL", name], timeout=60).returncode == 0
    wait_for(lambda: state(job, task) in FINISHED, f"{name} to end after SIGKILL", 120, logs)
    assert state(job, task) != "COMPLETED", "the task finished before the kill"
    requeue = subprocess.run(["scontrol", "requeue", name], capture_output=True, text=True, timeout=60)
    assert requeue.returncode == 0, requeue.stderr


def part_record(cache: Path, index: int, num_parts: int) -> dict:
    try:
        return json.loads((part_dir(cache, index, num_parts) / PART_FILE).read_text())
    except (OSError, ValueError):
        return {"complete": False, "shards": []}


def shard_stats(cache: Path, index: int, num_parts: int, names) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each named shard's directory and arrays: a rewritten shard changes them."""
    part = part_dir(cache, index, num_parts)
    stats = {}
    for name in names:
        for path in [part / name, *sorted((part / name).rglob("*"))]:
            st = path.stat()
            stats[str(path.relative_to(part))] = (st.st_ino, st.st_mtime_ns)
    return stats


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_train_job_killed_and_requeued_equals_eaglecache_train(slurm, tiny_target, tiny_cache, two_rank_run, tmp_path):
    """train.sbatch (srun + torchrun, 2 CPU ranks) killed after a checkpoint and requeued ends with the
    weights and losses of an uninterrupted `eaglecache train` (DeepSpeed's launcher) run."""
    run = tmp_path / "run"
    port = free_port()
    env = job_env(CACHE=tiny_cache, RUN=run, GPUS_PER_NODE=2, MASTER_PORT=port)
    job = sbatch(JOBS / "train.sbatch", ["--nodes=1", "--gpus-per-node=0", "--mem=8G", "--time=20"],
                 [f"target.path={tiny_target}", *TRAIN], env, tmp_path)
    wait_for(lambda: committed_steps(run) or state(job) in FINISHED, "a committed checkpoint", 600, tmp_path)
    assert state(job) == "RUNNING", f"the job is {state(job)}\n{job_logs(tmp_path)}"
    kill_and_requeue(job, "", tmp_path)
    killed_at = committed_steps(run)
    assert killed_at and not (run / "final").exists()

    reference = two_rank_run  # the same run through `eaglecache train` on this machine, outside Slurm
    wait_for(lambda: state(job) in FINISHED, "the requeued job to finish", 600, tmp_path)
    fields = tasks(job)[""]
    log = (tmp_path / f"eaglecache-train-{job}.out").read_text(errors="replace")
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    total = len(open_cache(tiny_cache).sample_ids) // 2  # global batch 2, one epoch
    assert "2 rank(s) x GA 1" in log
    # the requeued job resumed from its last checkpoint instead of starting over
    started = [int(m) for m in re.findall(r"training \d+ steps from step (\d+)", log)]
    assert started[-1] >= killed_at[-1] > 0, started
    assert f"trained {total}/{total} steps" in log
    assert (run / "final" / "model.safetensors").is_file()
    mine, theirs = fp32_weights(run), fp32_weights(reference)
    first = fp32_weights(run, step=killed_at[0])
    assert max((mine[name] - first[name]).abs().max().item() for name in mine) > 1e-3  # the steps after it count
    assert set(mine) == set(theirs)
    for name in theirs:
        assert mine[name].equal(theirs[name]), name
    assert losses(run) == losses(reference) and min(losses(run)) > 0
    # the job script removed DeepSpeed's CPU all-reduce buffers of its run, as `eaglecache train` does
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
