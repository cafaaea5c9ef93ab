"""The MiniMax-M3 job scripts parse, and their dry runs print commands the CLI accepts."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from eaglecache.cli import _collect_overrides, build_parser
from eaglecache.config import load_config

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "configs" / "minimax_m3").glob("*.s*"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_job_script_dry_run_prints_a_valid_command(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, DRY_RUN="1", SLURM_ARRAY_TASK_ID="5", NUM_SHARDS="16")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[0] == "eaglecache"
    args = build_parser().parse_args(argv[1:])
    _collect_overrides(args)
    config = load_config(args.config, args.overrides)
    if args.command == "precompute":
        assert (args.shard_index, args.num_shards) == (5, 16)
        assert config.target.tensor_parallel_size == 4
    if args.command == "train":
        assert config.train.launcher.num_nodes == 4 and config.train.launcher.hostfile
    assert len(SCRIPTS) == 3
