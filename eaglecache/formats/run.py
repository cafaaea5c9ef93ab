"""The run directory format (``eaglecache.run`` v1, docs/formats.md section 4): its file names, run.json, metrics.

A run directory, written by ``eaglecache train`` and read by resume, export and ablate::

    config.yaml          the resolved config (written first: it marks the directory as a run)
    run.json             format, version, what the run trains on (source fingerprint), world size,
                         total steps, config hash; a resume must agree with it
    deepspeed.json       the generated DeepSpeed config (for reading only)
    metrics.jsonl        one JSON record per log, with its "step"; tb/ the same as TensorBoard events
    checkpoints/step-XXXXXXX/   DeepSpeed's checkpoint; it counts once its COMMIT file exists
    final/model.safetensors, final/draft.json   the trained draft (eaglecache/formats/draft.py)
    failure.txt          while a run that lost a node is stopped: the one line saying which (train/peer_loss.py)

This module owns the names, the run.json document and its validation (a directory of
another format or version is refused in one line), the listing of committed checkpoints
and the reading of metrics and final weights. How checkpoints are written and verified is
the trainer's (train/checkpoint.py).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from eaglecache.errors import UserError

FORMAT, VERSION = "eaglecache.run", 1

CONFIG = "config.yaml"
RUN_JSON = "run.json"
DEEPSPEED_JSON = "deepspeed.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
COMMIT = "COMMIT"
FINAL = "final"
FINAL_WEIGHTS = "model.safetensors"
FINAL_ARCH = "draft.json"
FAILURE = "failure.txt"
# What train writes at a run directory's top level (ablate adds its variant.json next to them).
ENTRIES = frozenset({CONFIG, RUN_JSON, DEEPSPEED_JSON, METRICS, TENSORBOARD, CHECKPOINTS, FINAL, FAILURE})
# run.json keys a resume must find unchanged once a checkpoint is committed
RESUME_KEYS = ("source", "config_hash", "total_steps")


TAG_GLOB = "step-*"


def tag_of(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / tag_of(step)


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints whose COMMIT file exists, oldest first."""
    return sorted(int(path.name.split("-")[1]) for path in (Path(run_dir) / CHECKPOINTS).glob(TAG_GLOB)
                  if (path / COMMIT).is_file())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Written whole, fsynced, then renamed into place: a reader sees the old document or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_document(*, code_version: str, source_fingerprint: dict[str, Any], world_size: int, total_steps: int,
                 config_hash: str) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "code_version": code_version, "source": source_fingerprint,
            "world_size": world_size, "total_steps": total_steps, "config_hash": config_hash}


def read_run_json(run_dir: Path, required: bool = True) -> Optional[dict[str, Any]]:
    """RUN_DIR/run.json, checked to be this format and version; None when absent and not ``required``."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        if required:
            raise UserError(f"{run_dir}: no {RUN_JSON} (not a training run directory)")
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise UserError(f"{run_dir}: not an {FORMAT} v{VERSION} directory")
    return doc


def write_run_json(run_dir: Path, doc: dict[str, Any]) -> None:
    """run.json; refuses a run directory whose committed checkpoints were made with another source,
    config or length (RESUME_KEYS)."""
    old = read_run_json(run_dir, required=False)
    if old is not None and committed_steps(run_dir):
        for key in RESUME_KEYS:
            if old.get(key) != doc[key]:
                raise UserError(f"{run_dir} holds a run with another {key}; use a new --output to start over")
    write_json_atomic(Path(run_dir) / RUN_JSON, doc)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, oldest first; [] when there are none."""
    path = Path(run_dir) / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def final_paths(run_dir: Path) -> tuple[Path, Path]:
    """(weights, architecture) of a finished run; a one-line error when either is missing."""
    final = Path(run_dir) / FINAL
    weights, arch = final / FINAL_WEIGHTS, final / FINAL_ARCH
    if not weights.is_file() or not arch.is_file():
        raise UserError(f"{run_dir} is not a finished training run (needs {FINAL}/{FINAL_WEIGHTS} and "
                        f"{FINAL}/{FINAL_ARCH})")
    return weights, arch


def read_final_arch(run_dir: Path) -> dict[str, Any]:
    """final/draft.json: the DraftArch fields (eaglecache/formats/draft.py) plus the run's provenance."""
    return json.loads(final_paths(run_dir)[1].read_text())
