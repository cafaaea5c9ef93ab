"""A rank's report of a lost peer: which node went away, in one line, instead of a collective's traceback.

When a node dies mid-run its ranks stop answering. The survivors learn it inside a
collective: at once where the dead node's kernel resets the connections (gloo: "Read
error [10.0.0.12]:41234: Connection reset by peer"), after
``train.launcher.collective_timeout_s`` where nothing answers at all (a powered-off node
or a partition). Either way the exception names an address or nothing; the table of
every rank's host, gathered once at start, turns it into the node's name and ranks.

The rank that catches it writes the line to ``RUN_DIR/failure.txt`` (the
``eaglecache train`` launcher prints it as its one error line) and, when no such
launcher wraps the ranks (torchrun under Slurm), prints it itself.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional

from eaglecache.formats import run as run_format

PEER_LOST_EXIT = 3  # a rank's exit status after a lost peer (2 is bad input, 1 anything else)
FAILURE_FILE = run_format.FAILURE  # the last run's lost-peer line, removed when a run starts
# what gloo (tcp/pair.cc) and NCCL put in the exception when the peer's end of a connection went away
# ("Read error [10.0.0.12]:41234: Connection reset by peer", "Connection closed by peer [10.0.0.12]:51845")
_REASON = re.compile(r"Connection reset by peer|Connection closed by peer|Connection refused|Broken pipe|"
                     r"Remote end closed|Connection timed out", re.I)
_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:\d+")
_TIMED_OUT = re.compile(r"timed out|timeout|watchdog", re.I)


def my_addresses() -> list[str]:
    """This host's name and the addresses it resolves to (gloo and NCCL bind where the hostname resolves)."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        infos = []
    return [name, *sorted({info[4][0] for info in infos})]


def gather_hosts() -> list[list[str]]:
    """[hostname, address...] of every rank, by rank (one all_gather at start, while every peer is alive)."""
    import torch.distributed as dist

    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, my_addresses())
    return table


def nodes_of(hosts: list[list[str]]) -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = {}
    for rank, entry in enumerate(hosts):
        nodes.setdefault(entry[0], []).append(rank)
    return nodes


def describe(exc: BaseException, hosts: list[list[str]], timeout_s: int) -> Optional[str]:
    """The one line for ``exc`` if it is a lost peer or a collective's timeout, else None (a bug: re-raise it)."""
    text = str(exc)
    reason, address = _REASON.search(text), _ADDRESS.search(text)
    if reason and address:
        address, reason = address.group(1), reason.group(0).lower()
        lost = {name: ranks for name, ranks in nodes_of(hosts).items() if address in hosts[ranks[0]][1:]}
        if lost:
            names = ", ".join(f"{name} ({_ranks(ranks)})" for name, ranks in lost.items())
            return f"lost node {names}: {address} {reason}"
        return f"lost a peer at {address} ({reason}); no rank's host resolves to it (hosts: {_hosts_line(hosts)})"
    if _TIMED_OUT.search(text) and ("gloo" in text.lower() or "nccl" in text.lower() or "collective" in text.lower()
                                    or "operation" in text.lower()):
        return (f"a collective timed out after train.launcher.collective_timeout_s={timeout_s} s: a rank stopped "
                f"answering, a node lost or hung (the nodes: {_hosts_line(hosts)})")
    return None


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _hosts_line(hosts: list[list[str]]) -> str:
    return ", ".join(f"{name} ({_ranks(ranks)})" for name, ranks in nodes_of(hosts).items())


def record(run_dir: Path, line: str) -> None:
    """RUN_DIR/failure.txt = line, whole or not at all (several surviving ranks may write the same line)."""
    tmp = run_dir / f".{FAILURE_FILE}.{os.getpid()}"
    tmp.write_text(line + "\n")
    os.replace(tmp, run_dir / FAILURE_FILE)


def recorded(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / FAILURE_FILE).read_text().strip() or None
    except OSError:
        return None


def clear(run_dir: Path) -> None:
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
