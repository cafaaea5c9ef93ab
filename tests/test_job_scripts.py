"""The MiniMax-M3 job scripts parse, and their dry runs print commands the CLI accepts.

tests/test_slurm.py runs the Slurm scripts under a real Slurm; here each runs with plain bash, from a
copy outside the repository (sbatch runs such a copy from its spool directory), with DRY_RUN=1.
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from eaglecache.cli import _collect_overrides, build_parser
from eaglecache.config import load_config
from eaglecache.train.main import parse_args as parse_train_args

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "configs" / "minimax_m3").glob("*.s*"))
SLURM_SCRIPTS = [p for p in SCRIPTS if p.suffix == ".sbatch"]


def dry_run(script: Path, tmp_path: Path, *args: str, **env_values: str) -> list[str]:
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    copy = tmp_path / "spool" / "slurm_script"  # where a job's script lies under Slurm: no repository around it
    copy.parent.mkdir()
    shutil.copy(script, copy)
    env = dict(os.environ, DRY_RUN="1", **env_values)
    out = subprocess.run(["bash", str(copy), *args], capture_output=True, text=True, env=env, timeout=30,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout.strip())


def eaglecache_command(argv: list[str]):
    assert argv[0] == "eaglecache"
    args = build_parser().parse_args(argv[1:])
    _collect_overrides(args)
    return args, load_config(args.config, args.overrides)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_job_script_dry_run_prints_a_valid_command(script, tmp_path):
    argv = dry_run(script, tmp_path, SLURM_ARRAY_TASK_ID="5", NUM_PARTS="16")
    if script.name == "train.sbatch":
        assert argv[argv.index("-c") - 1] == "bash" and "eaglecache.train.main" in argv[argv.index("-c") + 1]
        args = parse_train_args(argv[argv.index("-c") + 3:])  # after the node command and its $0
        config = load_config(args.config, args.overrides)
        assert config.train.launcher.num_nodes == 4 and config.train.launcher.num_gpus == 8
        assert config.train.launcher.hostfile is None  # Slurm's srun starts the nodes, not DeepSpeed's ssh
        return
    args, config = eaglecache_command(argv)
    if args.command == "precompute":
        assert (args.part_index, args.num_parts) == (5, 16)
        assert config.target.tensor_parallel_size == 4
    if args.command == "train":
        assert config.train.launcher.num_nodes == 4 and config.train.launcher.hostfile
    assert len(SCRIPTS) == 4


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_script_needs_no_repository_and_passes_overrides_on(script, tmp_path):
    """No REPO, no CONFIG: the config by name (packaged with eaglecache); arguments after the script are
    overrides, last."""
    env = {k: v for k, v in os.environ.items() if k not in ("REPO", "CONFIG")}
    env.update(DRY_RUN="1", SLURM_ARRAY_TASK_ID="1")
    copy = tmp_path / "slurm_script"
    shutil.copy(script, copy)
    out = subprocess.run(["bash", str(copy), "target.tensor_parallel_size=1"], capture_output=True, text=True,
                         env=env, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout.strip())
    assert argv[argv.index("--config") + 1] == "minimax_m3"
    assert argv[-1] == "target.tensor_parallel_size=1"
    assert not any(str(tmp_path) in a for a in argv)  # nothing derived from the script's own location


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_job_without_eaglecache_on_path_is_one_error_line(script, tmp_path):
    """A job submitted from a shell where eaglecache's environment was not active."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "0", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and "eaglecache" in line and "activate its environment before sbatch" in line


def test_the_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: scripts/gpu_check.sh would run the check")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "check")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no CUDA device")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "check").exists()


def test_the_gpu_checks_overrides_are_settings_the_config_has():
    import re

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    overrides = [o.rstrip(")\"'") for o in re.findall(r"\b((?:train|serve|precompute|data|target)\.[\w.]+=\S+)", script)]
    assert len(overrides) >= 8, overrides
    for override in overrides:  # each alone: a misspelt key or a bad value is a config error
        load_config(None, [override])
