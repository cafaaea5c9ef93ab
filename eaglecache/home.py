"""Where eaglecache keeps what it builds or measures once per machine: the tiny target's builds and the
dtype probe (``$EAGLECACHE_HOME``, default ``~/.cache/eaglecache``)."""

from __future__ import annotations

import os
from pathlib import Path


def eaglecache_home() -> Path:
    return Path(os.environ.get("EAGLECACHE_HOME") or Path.home() / ".cache" / "eaglecache")
