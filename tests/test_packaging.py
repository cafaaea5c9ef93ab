"""A plain (non-editable) install works from any directory: configs ship inside the package.

The wheel is built from a copy of the checkout and installed into a fresh venv that borrows the
already-installed dependencies (``--system-site-packages``), so only eaglecache itself is new.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "eaglecache", "data", "precompute", "train", "serve", "configs"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True)
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    wheel = next(wheels.glob("eaglecache-*.whl"))
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return env_dir / "bin", elsewhere


def _run(venv, *args):
    bindir, cwd = venv
    return subprocess.run([str(bindir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True)


def test_the_installed_package_is_the_wheel_not_the_checkout(venv):
    proc = _run(venv, "python", "-c", "import eaglecache, eaglecache.config as c; print(eaglecache.__file__); "
                "print(c.DEFAULT_CONFIG)")
    assert proc.returncode == 0, proc.stderr
    module, default = proc.stdout.split()
    assert "site-packages" in module and not module.startswith(str(REPO)), module
    assert "site-packages" in default and Path(default).is_file(), default


def test_help_and_packaged_configs_work_from_another_directory(venv):
    assert _run(venv, "eaglecache", "--help").returncode == 0
    shown = _run(venv, "eaglecache", "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert "ttt_length: 7" in shown.stdout and 'dtype: "auto"' in shown.stdout
    production = _run(venv, "eaglecache", "config", "show", "--config", "minimax_m3", "train.lr=2e-4")
    assert production.returncode == 0, production.stderr
    assert "hidden" not in production.stderr and "lr: 0.0002" in production.stdout
    listed = _run(venv, "eaglecache", "config", "list")
    assert "precompute.sbatch" in listed.stdout and "site-packages" in listed.stdout


def test_a_stage_checks_its_config_and_inputs_from_another_directory(venv):
    bad_key = _run(venv, "eaglecache", "plan", "--config", "minimax_m3", "train.nope=1")
    last = bad_key.stderr.strip().splitlines()[-1]
    assert bad_key.returncode == 2 and last.startswith("error: ") and "minimax_m3" in last
    assert last.endswith("unknown config key: train.nope"), last
    missing = _run(venv, "eaglecache", "precompute", "--input", "no-such-data", "--output", "cache")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (venv[1] / "cache").exists()
