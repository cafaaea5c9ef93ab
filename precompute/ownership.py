"""Which precompute job owns a cache part: a lock held for the job's whole life, and its vLLM processes.

Two jobs started on the same ``--shard-index`` by mistake must not both write one
part. The owner holds an ``flock`` on ``parts/part-IIIII-of-NNNNN.lock``; the
kernel drops it when the holder dies, even by SIGKILL, so a killed job never
leaves a stale lock (a PID file would).

The lock alone is not enough: vLLM's EngineCore and its worker (where the shard
writer runs) are separate processes that outlive a SIGKILLed driver, keep
writing the requests in flight and then idle forever on their memory. So the
lock is also held by a watchdog process (it inherits the lock's file
description) that the driver tells the PIDs of its engine processes; when the
driver dies, the watchdog kills them, waits until they are gone, and only then
exits and lets the lock go. A job restarted with the same command therefore
never meets a writer of the previous one.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from eaglecache.errors import UserError


def _identity(pid: int) -> str:
    """'pid create_time': a PID alone may be reused by another process after its owner died."""
    import psutil

    return f"{pid} {psutil.Process(pid).create_time():.6f}"


class PartLock:
    """Exclusive ownership of one part of a cache, for this process and the engine processes it adopts."""

    def __init__(self, cache_dir: str | Path, name: str):
        parts = Path(cache_dir) / "parts"
        parts.mkdir(parents=True, exist_ok=True)
        self.path = parts / f"{name}.lock"
        self.name = name
        self._file = None
        self._watchdog: subprocess.Popen | None = None

    def acquire(self) -> "PartLock":
        """Take the lock or raise UserError naming the job that holds it; starts the watchdog."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{self.name} of {self.path.parent.parent} is being written by another precompute job "
                            f"({holder}); one part takes one job: check --shard-index/--num-shards") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}))
        f.flush()
        self._file = f
        # the watchdog shares the lock (same open file description) and lives on its stdin pipe
        self._watchdog = subprocess.Popen([sys.executable, "-m", __name__, str(f.fileno())], stdin=subprocess.PIPE,
                                          pass_fds=(f.fileno(),), close_fds=True)
        return self

    def adopt_children(self) -> None:
        """Hand the watchdog every process this one has started so far (the vLLM engine)."""
        import psutil

        skip = {self._watchdog.pid}
        lines = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.pid in skip or "resource_tracker" in " ".join(child.cmdline()):
                    continue  # the tracker cleans shared memory up itself once its users are gone
                lines.append(_identity(child.pid) + "\n")
            except psutil.NoSuchProcess:
                continue
        self._watchdog.stdin.write("".join(lines).encode())
        self._watchdog.stdin.flush()

    def release(self) -> None:
        """Give the lock up; adopted processes still alive are killed first (call after the engine is shut)."""
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait()
            self._watchdog = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _watch(lock_fd: int) -> None:
    """The watchdog: hold the lock until stdin closes, then kill the adopted processes still alive."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the job reaches us too: the driver decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    adopted = []
    for line in sys.stdin:  # EOF when the driver releases the lock or dies
        pid, created = line.split()
        adopted.append((int(pid), float(created)))
    alive = []
    for pid, created in adopted:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 60.0
    while alive and time.monotonic() < deadline:  # a zombie no longer writes: count it as gone
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    os.close(lock_fd)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
