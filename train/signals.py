"""Stop signals for the DeepSpeed launchers this process starts: forwarded to each launcher's process group.

`eaglecache train` and `eaglecache ablate` start DeepSpeed's runner as a child; its per-node launcher
starts the ranks. A ``kill PID`` of our command (a scheduler's stop, a supervisor) reaches our process
only: without forwarding the runner and the ranks trained on. DeepSpeed's runner forwards nothing itself
on a single node, so each launcher runs in its own session and a SIGTERM, SIGINT or SIGHUP we get goes
to its whole process group: runner, per-node launcher (which then terminates the ranks' process trees)
and ranks. Ctrl-C reaches each group once, through here, as the groups are not the terminal's; SIGHUP is
forwarded because in their own sessions they no longer get the terminal's hangup themselves.

Signal handlers can only be set on the main thread, and ablate runs its variants' launchers from
worker threads, so the handlers are installed by ``forwarding_signals()`` around the whole stretch that
starts launchers (ablate's variant pool, or one ``eaglecache train``), and ``run_launcher`` registers
each launcher's group with it. A launcher started outside any such stretch (a worker thread of a caller
that set none) stays in our own process group, where a terminal's Ctrl-C reaches it directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator, Optional

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# how long a launcher may still run once a rank reported the run lost, before it is stopped
ABANDON_AFTER_S = 10


class _Forwarder:
    """The process's one forwarding state: the signals received and the running launchers' groups."""

    def __init__(self) -> None:
        self.active = False
        self.received: list[int] = []
        self.groups: set[int] = set()
        self.lock = threading.Lock()

    def handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        for group in list(self.groups):
            _kill_group(group, signum)


_FORWARDER = _Forwarder()


def _kill_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # the group is gone already
        pass


@contextlib.contextmanager
def forwarding_signals() -> Iterator[list[int]]:
    """While inside, SIGTERM, SIGINT and SIGHUP to this process go to every launcher ``run_launcher``
    starts; yields the list of signals received (empty while none came). Nested or off the main thread it
    only yields the enclosing stretch's list (empty when there is none)."""
    if _FORWARDER.active or threading.current_thread() is not threading.main_thread():
        yield _FORWARDER.received if _FORWARDER.active else []
        return
    _FORWARDER.received = []
    previous = {signum: signal.signal(signum, _FORWARDER.handle) for signum in FORWARDED}
    _FORWARDER.active = True
    try:
        yield _FORWARDER.received
    finally:
        _FORWARDER.active = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_launcher(cmd: list[str], env: dict[str, str],
                 failed: Optional[Callable[[], bool]] = None) -> tuple[int, Optional[int]]:
    """Run a launcher to its end, stop signals forwarded to its process group (module docstring).
    Returns (its return code, the first signal this process received meanwhile, or None). ``failed``: see
    ``_wait``."""
    with forwarding_signals() as received:
        forwarding = _FORWARDER.active
        proc = subprocess.Popen(cmd, env=env, start_new_session=forwarding)
        if forwarding:
            with _FORWARDER.lock:
                _FORWARDER.groups.add(proc.pid)
            if received:  # a stop came while it started (or before): it is for this launcher too
                _kill_group(proc.pid, received[-1])
        try:
            rc = _wait(proc, failed, own_group=forwarding)
        finally:
            with _FORWARDER.lock:
                _FORWARDER.groups.discard(proc.pid)
        return rc, (received[0] if received else None)


def _wait(proc: subprocess.Popen, failed: Optional[Callable[[], bool]], own_group: bool) -> int:
    """``proc``'s return code. Once ``failed()`` has said for ABANDON_AFTER_S that the run is over (a rank
    reported a lost node) and the launcher still waits, it is stopped: pdsh waits on the ssh session of a
    node that hangs (or lost power) for as long as TCP lets it. SIGTERM first (DeepSpeed's runner then
    pkills the ranks on every node it reaches), SIGKILL ABANDON_AFTER_S later."""
    if failed is None:
        return proc.wait()
    failed_at = stopped_at = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if failed_at is None:
            failed_at = now if failed() else None
        elif now - failed_at > ABANDON_AFTER_S and (stopped_at is None or now - stopped_at > ABANDON_AFTER_S):
            signum = signal.SIGTERM if stopped_at is None else signal.SIGKILL
            if own_group:
                _kill_group(proc.pid, signum)
            else:
                proc.send_signal(signum)
            stopped_at = now
