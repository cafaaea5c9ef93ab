"""A lost or hung node as one line: the collective errors of gloo named by the node's host and ranks, anything
else left alone; and the launcher stopped once a rank reported the run lost but it still waits on a node.
(The real thing, on two hosts: tests/test_cluster.py.)"""

import sys
import time

import pytest

from eaglecache.train import peer_loss, signals

HOSTS = [["n1", "10.0.0.11"], ["n1", "10.0.0.11"], ["n2", "10.0.0.12", "fd00::12"]]


@pytest.mark.parametrize("message", [
    # gloo's tcp/pair.cc, when the peer's kernel resets or closes the connection (both seen on two hosts)
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.12]:30894: Connection reset by "
    "peer. This is typically caused by a remote worker hanging",
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.12]:51845. This is "
    "typically caused by a remote worker crashing.",
])
def test_a_reset_connection_names_the_node_and_its_ranks(message):
    line = peer_loss.describe(RuntimeError(message), HOSTS, 30)
    assert line.startswith("lost node n2 (rank 2): 10.0.0.12 connection ")


def test_an_address_of_two_ranks_host_names_both_ranks():
    line = peer_loss.describe(RuntimeError("Read error [10.0.0.11]:1: Connection reset by peer"), HOSTS, 30)
    assert line == "lost node n1 (ranks 0, 1): 10.0.0.11 connection reset by peer"


def test_an_unknown_address_says_so_and_lists_the_nodes():
    line = peer_loss.describe(RuntimeError("Read error [10.0.0.99]:1: Connection reset by peer"), HOSTS, 30)
    assert "10.0.0.99" in line and "n1 (ranks 0, 1), n2 (rank 2)" in line


def test_a_timeout_names_the_setting_and_the_nodes():
    line = peer_loss.describe(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms "
                                           "for recv operation to complete"), HOSTS, 30)
    assert line.startswith("a collective timed out after train.launcher.collective_timeout_s=30 s")


@pytest.mark.parametrize("message", ["CUDA out of memory", "shape mismatch: [3] vs [4]", "Connection reset by peer"])
def test_other_errors_are_not_taken_for_a_lost_node(message):
    assert peer_loss.describe(RuntimeError(message), HOSTS, 30) is None


def test_the_failure_line_is_recorded_whole_and_cleared(tmp_path):
    assert peer_loss.recorded(tmp_path) is None
    peer_loss.record(tmp_path, "lost node n2 (rank 1)")
    assert peer_loss.recorded(tmp_path) == "lost node n2 (rank 1)"
    assert [p.name for p in tmp_path.iterdir()] == [peer_loss.FAILURE_FILE]  # no temporary file left
    peer_loss.clear(tmp_path)
    assert peer_loss.recorded(tmp_path) is None


def test_a_launcher_still_waiting_after_the_run_failed_is_stopped(monkeypatch):
    """pdsh waits on a hung node's ssh session: once the failure is reported, the launcher gets
    ABANDON_AFTER_S, then SIGTERM; one that ignores it, SIGKILL after as long again."""
    monkeypatch.setattr(signals, "ABANDON_AFTER_S", 1.0)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "time.sleep(60)"]
    start = time.monotonic()
    rc, received = signals.run_launcher(stubborn, env=None, failed=lambda: True)
    assert rc == -9 and received is None
    assert time.monotonic() - start < 10
    rc, _ = signals.run_launcher([sys.executable, "-c", "pass"], env=None, failed=lambda: True)
    assert rc == 0  # a launcher that ends by itself is left alone
    rc, _ = signals.run_launcher([sys.executable, "-c", "import time; time.sleep(3)"], env=None, failed=lambda: False)
    assert rc == 0  # nothing reported: no limit
