"""Beyond one node, on a real two-node cluster on this machine (scripts/cluster.sh: hosts n1 and n2 in network
namespaces, each with its own address, hostname, sshd and slurmd; a two-node Slurm).

- Slurm: configs/minimax_m3/train.sbatch with --nodes=2 (srun + torchrun per node, one CPU rank each); node n2
  lost mid-run (every process SIGKILLed): the survivor exits with one `error:` line naming n2, nothing is left
  on either node, and once n2 is back the requeued job ends with the one-node run's weights, bit for bit.
- DeepSpeed's own multi-node launcher (pdsh over ssh, a hostfile): `eaglecache train` on two nodes gives the
  one-node run's weights bit for bit (2 ranks either way: each reduction adds the same two values).
- A hung node (its processes stopped, no connection reset): the survivor gives up after
  train.launcher.collective_timeout_s, the command returns with one error line, and the checkpoint of the two
  nodes resumes on one node (one rank, GA 2: DeepSpeed's universal checkpoint) to the same weights within 1e-6.
- Precompute: the array's two tasks on the two nodes, one SIGKILLed and requeued; the cache equals one job's.
Skipped, with the reason, only where the cluster cannot be made (not root, no namespaces, no apt).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults_precompute import compare
from test_slurm import (FINISHED, JOBS, SHARDS, TRAIN, free_port, job_env, job_logs, kill_and_requeue, part_record,
                        sbatch, shard_stats, state, tasks, wait_for)
from test_train_equivalence import fp32_weights, losses
from eaglecache.formats.cache_reader import open_cache
from eaglecache.formats.run import committed_steps
from eaglecache.train.peer_loss import FAILURE_FILE, PEER_LOST_EXIT

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "scripts" / "cluster.sh"
DAEMONS = {"sshd", "slurmd"}  # what a node runs when no job is on it
TIMEOUT_S = 10  # train.launcher.collective_timeout_s of these runs


def cluster_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster, up; SLURM_CONF points this module's sbatch/scontrol calls at its Slurm."""
    result = cluster_sh("up")
    if result.returncode == 3:
        pytest.skip(f"no two-node cluster here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    conf = next(line.split("=", 1)[1] for line in result.stdout.splitlines() if line.startswith("SLURM_CONF="))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if saved is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = saved
    down = cluster_sh("down")  # this machine as it was: no namespaces, /etc/hosts and ssh_config.d restored
    assert down.returncode == 0, down.stderr


def processes_on(node: str) -> list[str]:
    """The names of the processes running on ``node`` (its namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", f"ec-{node}"], capture_output=True, text=True).stdout.split()
    names = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue  # ended meanwhile
        if "\nState:\tZ" not in status:
            names.append(status.split("\n", 1)[0].split("\t", 1)[1])
    return sorted(names)


def only_daemons_left(*nodes: str) -> bool:
    return all(set(processes_on(node)) <= DAEMONS for node in nodes)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_same_weights(run: Path, reference: Path, tolerance: float = 0.0) -> None:
    mine, theirs = fp32_weights(run), fp32_weights(reference)
    assert set(mine) == set(theirs)
    worst = max((mine[name] - theirs[name]).abs().max().item() for name in theirs)
    loss_delta = max(abs(a - b) for a, b in zip(losses(run), losses(reference)))
    print(f"{run.name}: max |dweight| {worst:.3g}, max |dloss| {loss_delta:.3g} against the one-node run")
    for name in theirs:
        if tolerance:
            assert (mine[name] - theirs[name]).abs().max().item() <= tolerance, name
        else:
            assert mine[name].equal(theirs[name]), name


def test_slurm_two_nodes_lose_one_and_the_requeued_job_ends_with_the_one_node_weights(
        cluster, tiny_target, tiny_cache, two_rank_run, tmp_path):
    run = tmp_path / "run"
    env = job_env(CACHE=tiny_cache, RUN=run, GPUS_PER_NODE=1, MASTER_PORT=free_port())
    job = sbatch(JOBS / "train.sbatch", ["--nodes=2", "--gpus-per-node=0", "--mem=4G", "--time=20"],
                 [f"target.path={tiny_target}", *TRAIN, f"train.launcher.collective_timeout_s={TIMEOUT_S}"], env,
                 tmp_path)
    wait_for(lambda: committed_steps(run) or state(job) in FINISHED, "a committed checkpoint", 600, tmp_path)
    assert state(job) == "RUNNING", f"the job is {state(job)}\n{job_logs(tmp_path)}"
    assert tasks(job)[""]["NodeList"] == "n[1-2]"
    lost_at = time.monotonic()
    assert cluster_sh("kill-node", "n2").returncode == 0
    killed_at = committed_steps(run)
    assert killed_at and not (run / "final").exists()

    # the survivor's rank sees the reset connection at once; the bound is the collective timeout
    wait_for(lambda: (run / FAILURE_FILE).is_file(), "rank 0 to report the lost node", TIMEOUT_S + 5, tmp_path)
    wait_for(lambda: only_daemons_left("n1"), "the job's processes on n1 to end", 60, tmp_path)
    print(f"the survivor reported n2 lost and its processes ended {time.monotonic() - lost_at:.1f} s after the kill")
    assert processes_on("n2") == []
    # Slurm sees n2 down and requeues the job itself (--requeue); otherwise the admin does
    wait_for(lambda: state(job) != "RUNNING", "the job to leave RUNNING", 120, tmp_path)
    log = (tmp_path / f"eaglecache-train-{job}.out").read_text(errors="replace")
    lines = error_lines(log)
    assert len(lines) == 1 and re.match(r"error: lost node n2 \(rank 1\): [\d.]+ connection (reset|closed) by peer; ",
                                        lines[0]), log[-3000:]

    assert cluster_sh("up").returncode == 0  # the node is back
    if state(job) != "PENDING":
        assert subprocess.run(["scontrol", "requeue", job], timeout=60).returncode == 0
    wait_for(lambda: state(job) in FINISHED and state(job) != "PENDING", "the requeued job to finish", 600, tmp_path)
    fields = tasks(job)[""]
    log = (tmp_path / f"eaglecache-train-{job}.out").read_text(errors="replace")
    assert (fields["JobState"], fields["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    resumed = [int(step) for step in re.findall(r"training \d+ steps from step (\d+)", log)]
    assert resumed[-1] >= killed_at[-1] > 0, resumed
    assert_same_weights(run, two_rank_run)
    assert losses(run) == losses(two_rank_run)
    assert only_daemons_left("n1", "n2")


def hostfile_run(tmp_path: Path, tiny_cache, tiny_target, out: Path, *overrides: str, **popen):
    """`eaglecache train` through DeepSpeed's multi-node runner: a hostfile of n1 and n2, one rank each, one
    thread per rank (DeepSpeed's .deepspeed_env in the directory it runs from, as its users pass variables)."""
    (tmp_path / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n")
    cmd = [sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(tiny_cache), "--output", str(out),
           f"target.path={tiny_target}", *TRAIN, "train.launcher.num_nodes=2", "train.launcher.num_gpus=1",
           f"train.launcher.hostfile={tmp_path / 'hostfile'}", f"train.launcher.master_port={free_port()}", *overrides]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_deepspeed_hostfile_two_nodes_equal_one_node_bit_for_bit(cluster, tiny_target, tiny_cache, two_rank_run,
                                                                   tmp_path):
    out = tmp_path / "run"
    proc = hostfile_run(tmp_path, tiny_cache, tiny_target, out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert "n1: " in log and "n2: " in log and "2 rank(s) x GA 1" in log  # pdsh's prefixes: both nodes ran
    assert_same_weights(out, two_rank_run)
    assert losses(out) == losses(two_rank_run)
    assert only_daemons_left("n1", "n2")


def test_a_hung_node_times_out_and_its_checkpoint_resumes_on_one_node(cluster, tiny_target, tiny_cache, two_rank_run,
                                                                      tmp_path):
    out = tmp_path / "run"
    proc = hostfile_run(tmp_path, tiny_cache, tiny_target, out, f"train.launcher.collective_timeout_s={TIMEOUT_S}")
    deadline = time.monotonic() + 600
    while not committed_steps(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = subprocess.run(["ip", "netns", "pids", "ec-n2"], capture_output=True, text=True).stdout.split()
    for pid in pids:  # n2 hangs: nothing of it answers, nothing resets a connection
        try:
            os.kill(int(pid), signal.SIGSTOP)
        except ProcessLookupError:
            pass
    hung_at = time.monotonic()
    assert proc.poll() is None, "the run finished before n2 was stopped"
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S + 120)
    finally:
        cluster_sh("kill-node", "n2")  # what a hung node's reboot does; then it comes back
        assert cluster_sh("up").returncode == 0
    elapsed = time.monotonic() - hung_at
    print(f"`eaglecache train` returned {elapsed:.1f} s after n2 hung")
    assert proc.returncode == PEER_LOST_EXIT, log[-3000:]
    # the timeout, then ABANDON_AFTER_S for the launcher, then its pdsh kill on the hung node (ssh's timeouts)
    assert elapsed < TIMEOUT_S + 60, elapsed  # 31 s here
    assert [line.split(";")[0] for line in error_lines(log)] == [
        f"error: a collective timed out after train.launcher.collective_timeout_s={TIMEOUT_S} s: a rank stopped "
        "answering, a node lost or hung (the nodes: n1 (rank 0), n2 (rank 1))"], log[-3000:]
    assert only_daemons_left("n1", "n2")
    saved = committed_steps(out)
    assert saved and not (out / "final").exists()

    # 2 nodes -> 1 node: one rank, GA 2, the same global batch, from the two-node checkpoint
    resumed = subprocess.run([sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(tiny_cache), "--output",
                              str(out), f"target.path={tiny_target}", *TRAIN, "train.launcher.num_gpus=1"],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"from step {saved[-1]}" in text and "1 rank(s) x GA 2" in text
    assert f"resharding checkpoint step-{saved[-1]:07d}" in text
    assert_same_weights(out, two_rank_run, tolerance=1e-6)  # 1 rank x GA 2 == 2 ranks within 1e-6 (test_train_launcher)
    assert losses(out) == pytest.approx(losses(two_rank_run), rel=1e-5)
    assert not (out / FAILURE_FILE).exists()  # cleared by the run that resumed


def test_precompute_array_tasks_on_two_nodes_killed_and_requeued_equal_one_job(cluster, tiny_target, tiny_dataset,
                                                                                 tiny_cache, tmp_path):
    """2 array tasks, one per node (each asks for a node's two cores); task 1 SIGKILLed between two commits
    and requeued; the merged cache equals one job's."""
    cache = tmp_path / "cache"
    env = job_env(DATA=tiny_dataset, CACHE=cache, NUM_PARTS=2)
    # the script asks for 4 GPUs, 32 cores and 400 GB per task: sbatch's options replace its #SBATCH lines
    job = sbatch(JOBS / "precompute.sbatch", ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=2", "--mem=4G",
                                              "--time=20"],
                 [f"target.path={tiny_target}", *SHARDS], env, tmp_path)
    wait_for(lambda: part_record(cache, 1, 2)["shards"] or state(job, "1") in FINISHED,
             "task 1 to commit a shard", 600, tmp_path)
    assert state(job, "1") == "RUNNING", f"task 1 is {state(job, '1')}\n{job_logs(tmp_path)}"
    assert {tasks(job)[t]["NodeList"] for t in "01"} == {"n1", "n2"}  # one task per node
    kill_and_requeue(job, "1", tmp_path)
    record = part_record(cache, 1, 2)
    assert record["shards"] and not record["complete"], "task 1 was not killed between two commits"
    committed = [s["name"] for s in record["shards"]]
    before = shard_stats(cache, 1, 2, committed)

    wait_for(lambda: all(t["JobState"] in FINISHED for t in tasks(job).values()), "the array to finish", 600,
             tmp_path)
    final = tasks(job)
    assert {t: f["JobState"] for t, f in final.items()} == {"0": "COMPLETED", "1": "COMPLETED"}, job_logs(tmp_path)
    assert (final["0"]["Restarts"], final["1"]["Restarts"]) == ("0", "1")
    assert {p.name for p in tmp_path.glob("*.out")} == {f"eaglecache-precompute-{job}_{t}.out" for t in "01"}
    # the requeued task resumed: every shard committed before the kill is the same file, never rewritten
    assert shard_stats(cache, 1, 2, committed) == before
    done = sum(s["num_samples"] for s in record["shards"])
    log = (tmp_path / f"eaglecache-precompute-{job}_1.out").read_text(errors="replace")  # a kill may cut a character
    assert f"{done} already committed)" in log
    verify = subprocess.run([sys.executable, "-m", "eaglecache.cli", "cache", "verify", str(cache)],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert open_cache(cache).metadata["num_parts"] == 2
    assert compare(open_cache(tiny_cache), open_cache(cache))
    assert only_daemons_left("n1", "n2")
