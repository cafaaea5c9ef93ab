"""Which precompute job owns a cache part: a lock held for the job's whole life, and its vLLM processes.

Two jobs started on the same ``--part-index`` by mistake must not both write one
part. The owner holds an ``flock`` on the part's lock file (``parts/part-IIIII-of-NNNNN.lock``,
eaglecache/formats/cache.py); the
kernel drops it when the holder dies, even by SIGKILL, so a killed job never
leaves a stale lock (a PID file would).

The lock alone is not enough: vLLM's EngineCore and its worker (where the shard
writer runs) are separate processes that outlive a SIGKILLed driver, keep
writing the requests in flight and then idle forever on their memory. So the
lock is also held by a watchdog process (it inherits the lock's file
description) that notes every process the driver starts from then on (the
engine, during start-up too); when the driver dies, the watchdog kills them,
waits until they are gone, and only then exits and lets the lock go. A job
restarted with the same command therefore never meets a writer of the previous
one.
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
from eaglecache.formats.cache import lock_path


class PartLock:
    """Exclusive ownership of one part of a cache, for this process and the processes it starts."""

    def __init__(self, cache_dir: str | Path, name: str):
        self.path = lock_path(cache_dir, name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
                            f"({holder}); one part takes one job: check --part-index/--num-parts") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%F %T")}))
        f.flush()
        self._file = f
        # the watchdog shares the lock (same open file description) and lives on its stdin pipe
        self._watchdog = subprocess.Popen([sys.executable, "-m", __name__, str(f.fileno())], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, pass_fds=(f.fileno(),), close_fds=True)
        if self._watchdog.stdout.read(1) != b"+":  # it has listed the processes that are not the job's
            raise RuntimeError(f"the watchdog of {self.path} did not start")
        return self

    def release(self) -> None:
        """Give the lock up; processes the job started that still live are killed first (shut the engine
        down before)."""
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait()
            self._watchdog = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _watch(lock_fd: int) -> None:
    """The watchdog: note the driver's new descendants until stdin closes (released, or the driver died),
    then kill those still alive, wait until they are gone and drop the lock."""
    import select

    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the job reaches us too: the driver decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    driver = psutil.Process(os.getppid())
    older = {p.pid for p in driver.children(recursive=True)}  # not the job's: an in-process caller's own
    seen: dict[int, psutil.Process] = {}
    os.write(sys.stdout.fileno(), b"+")
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in children:
            if proc.pid in older or proc.pid in seen or proc.pid == os.getpid():
                continue
            try:
                # the tracker runs `-c "from multiprocessing.resource_tracker import main; ..."`; a bare
                # "resource_tracker" would also match every child started with `-W ...resource_tracker...`
                if "from multiprocessing.resource_tracker import" in " ".join(proc.cmdline()):
                    older.add(proc.pid)  # it cleans shared memory up itself once its users are gone
                    continue
            except psutil.Error:
                continue
            seen[proc.pid] = proc
    victims = list(seen.values())
    for proc in list(victims):  # and whatever they started after the driver's last look
        try:
            victims += proc.children(recursive=True)
        except psutil.Error:
            pass
    for proc in victims:
        try:
            proc.kill()  # psutil checks the creation time: a reused PID is left alone
        except psutil.Error:
            pass
    deadline = time.monotonic() + 60.0
    while victims and time.monotonic() < deadline:  # a zombie no longer writes: count it as gone
        victims = [p for p in victims if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    os.close(lock_fd)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
