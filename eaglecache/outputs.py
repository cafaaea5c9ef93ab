"""Claiming a command's output path before anything is written: ``claim_output`` and ``--overwrite``.

Every command that writes a file or directory calls ``claim_output`` from its CLI handler, before
any engine starts. A missing path, an empty directory, or what the same command wrote there
before (each command's ``owns`` test below: its own finished output, or its own unfinished one that
it resumes) goes through untouched; the command then writes, replaces or resumes it as it always
did. Anything else (unrelated files, another stage's output, a file where a directory goes) is
refused with one line naming the path, unless ``--overwrite`` is given: then it is removed first.

The ``owns`` tests look only at names and format markers, never at array data, so they are
instant; they are deliberately narrow (a directory holding one unknown name is not ours) because
the cost of a wrong "ours" is deleting or mixing into a user's files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from eaglecache.errors import UserError

log = logging.getLogger(__name__)

Owns = Callable[[Path], bool]


def add_overwrite_flag(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --output even when it holds something this command did not write "
                             "(it is removed first). Without it such an output is refused.")


def claim_output(path: str | Path, overwrite: bool, command: str, owns: Owns, kind: str = "dir") -> Path:
    """Check that ``path`` may be written by ``eaglecache <command>``; with ``overwrite``, clear it if not.

    ``kind`` is "dir" or "file": what the command writes at ``path``.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if kind == "dir" and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return path
    is_kind = path.is_dir() if kind == "dir" else path.is_file()
    if is_kind and _owns(owns, path):
        return path
    if not overwrite:
        raise UserError(f"{path} exists and was not written by `eaglecache {command}` "
                        "(use --overwrite to replace it)")
    _remove(path)
    return path


def _owns(owns: Owns, path: Path) -> bool:
    try:
        return bool(owns(path))
    except (OSError, ValueError, UnicodeDecodeError):  # unreadable markers: not provably ours
        return False


def _remove(path: Path) -> None:
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise UserError(f"will not remove {path} for --overwrite: it holds the current or home directory")
    log.warning("--overwrite: removing %s", path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# --- what each command counts as its own output ---------------------------------------------------

def _json_format(path: Path, format_: str) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("format") == format_


def _entries(path: Path) -> set[str]:
    """Names in ``path``, leaving out the dot-files commands use for temporaries."""
    return {p.name for p in path.iterdir() if not p.name.startswith(".")}


def tiny_target_build(path: Path) -> bool:
    """A finished `eaglecache target build` (which rebuilds it with --force, or returns it as it is)."""
    from eaglecache.tiny_target.build import BUILD_REPORT

    return (path / BUILD_REPORT).is_file() and (path / "config.json").is_file()


def prepared_dataset(path: Path) -> bool:
    from eaglecache.formats.dataset import DATASET_FORMAT, METADATA_FILE

    return _json_format(path / METADATA_FILE, DATASET_FORMAT)


def regenerated_file(path: Path) -> bool:
    return _json_format(path.with_name(path.name + ".json"), "eaglecache.regenerated")


def vocab_file(path: Path) -> bool:
    from eaglecache.formats.vocab import is_vocab_file

    return is_vocab_file(path)


def feature_cache(path: Path) -> bool:
    """A cache (any settings: precompute itself refuses one made with others, or resumes its own)."""
    from eaglecache.formats.cache import CACHE_FILE, FORMAT

    return _json_format(path / CACHE_FILE, FORMAT)


def train_run(path: Path) -> bool:
    """A run directory: train writes config.yaml before anything else, then only the run format's names
    (eaglecache/formats/run.py), plus the variant.json of an ablation's variant."""
    from eaglecache.formats import run

    return (path / run.CONFIG).is_file() and _entries(path) <= run.ENTRIES | {"variant.json"}


def ablation(path: Path) -> bool:
    """Results files and one run directory per variant (an empty one: a variant that failed to start); after
    ``--bench``, drafts/ (one exported draft per variant) and bench/ (bench's results)."""
    for name in _entries(path):
        entry = path / name
        if name in ("results.md", "results.csv", "ablation.png"):
            continue
        if name == "drafts" and entry.is_dir() and all(export_dir(d) for d in entry.iterdir()
                                                       if not d.name.startswith(".")):
            continue
        if name == "bench" and entry.is_dir() and bench_results(entry):
            continue
        if not entry.is_dir() or (any(entry.iterdir()) and not train_run(entry)):
            return False
    return True


def export_dir(path: Path) -> bool:
    return (path / "export.json").is_file()


def bench_results(path: Path) -> bool:
    # ablation.json: the record of `eaglecache ablate --bench` (train/ablation_bench.py) that wrote them
    return _entries(path) <= {"results.json", "results.md", "acceptance.png", "untrained-draft", "ablation.json"}


DEMO_ENTRIES = {"config.yaml", "sharegpt-subset.jsonl", "commands.sh", "regenerated.jsonl", "regenerated.jsonl.json",
                "dataset", "cache", "run", "draft", "bench", "summary.txt"}


def demo_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and _entries(path) <= DEMO_ENTRIES
