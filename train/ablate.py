"""``eaglecache ablate``: many training variants from one feature cache, each reproducible and skipped once done.

A variant is one point of the grid (the cartesian product of ``--grid KEY=[v1,v2]``
and ``--grid-file`` entries). It trains with ``eaglecache train`` into
``OUTPUT/<variant name>``, which then holds the resolved config.yaml, the run's
metrics.jsonl / TensorBoard logs, final weights and ``variant.json`` (overrides,
seed, cache fingerprint, code version, final metrics). Only ``train.*`` keys may
vary: anything else would need another cache. The cache is only ever read.

Running the same command again skips every variant whose variant.json says it
finished with the same fingerprint (cache, settings and code version); one finished
by other code is moved to ``OUTPUT/.stale/`` and trained again (resuming it would
train nothing). The results table and plots are rebuilt from all finished
variants. With ``--bench SET ...`` the finished variants are then
exported and measured in vLLM side by side (train/ablation_bench.py), and the
table gains vLLM's mean accept length per prompt set next to the simulated one.
A SIGTERM, SIGINT or SIGHUP stops every running variant's ranks (train/signals.py) and starts no more;
the same command then resumes them from their last checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from eaglecache.config import parse_override, with_overrides, yaml_load
from eaglecache.errors import UserError
from eaglecache.formats import run as run_format

log = logging.getLogger(__name__)
VARIANT_FORMAT, VARIANT_VERSION = "eaglecache.variant", 1
STALE = ".stale"  # variants finished by an earlier code version, kept (not shown) when retrained


def parse_grid(grid_args: list[str], grid_file: str | None) -> dict[str, list[Any]]:
    """{dotted key: values} from ``KEY=[a,b]`` strings and a YAML file of the same mapping."""
    grid: dict[str, list[Any]] = {}
    if grid_file:
        path = Path(grid_file)
        if not path.is_file():
            raise UserError(f"grid file not found: {grid_file}")
        loaded = yaml_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"grid file {grid_file}: expected a mapping of dotted keys to lists")
        grid.update(loaded)
    for text in grid_args:
        key, values = parse_override(text)
        grid[key] = values
    for key, values in grid.items():
        if not key.startswith("train."):
            raise UserError(f"grid key {key}: ablations reuse one cache, so only train.* keys can vary")
        if not isinstance(values, list) or not values:
            raise UserError(f"grid key {key}: expected a non-empty list of values, e.g. {key}=[1,2]")
    if not grid:
        raise UserError("no grid: give --grid KEY=[v1,v2] or --grid-file FILE")
    return grid


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _format_value(value: Any) -> str:
    # null as null: str(None) would reach the config as the string "None"
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) or value is None else str(value)


def variant_name(overrides: dict[str, Any]) -> str:
    """A readable, filesystem-safe directory name: ``ttt_length-3_lr-0.0001``."""
    parts = [f"{key.split('.')[-1]}-{_format_value(value)}" for key, value in overrides.items()]
    name = "_".join(parts)
    safe = "".join(c if c.isalnum() or c in "-_.," else "+" for c in name)
    return safe if len(safe) <= 80 else safe[:60] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def override_strings(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={_format_value(value)}" for key, value in overrides.items()]


def code_version() -> str:
    """sha256 of the package's Python sources: what produced a variant, git or not."""
    import eaglecache

    root = Path(eaglecache.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in ("eaglecache", "data", "precompute", "train", "serve"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_fingerprint(cache_dir: str) -> str:
    from eaglecache.formats.cache_reader import open_cache

    return hashlib.sha256(json.dumps(open_cache(cache_dir).metadata, sort_keys=True).encode()).hexdigest()


def run_variant(base, overrides: dict[str, Any], *, cache: str, output: Path, vocab: str | None,
                fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Train one variant of the ``base`` config (or find it done); returns its variant.json record."""
    from eaglecache.train.checkpoint import run_fingerprint
    from eaglecache.train.launch import run_train

    name = variant_name(overrides)
    run_dir = output / name
    record_path = run_dir / "variant.json"
    config = with_overrides(base, override_strings(overrides))
    # The run's own identity rule (train/checkpoint.py). It differs from what earlier releases recorded (a hash
    # of the whole target and train sections), but so does the "code" entry after any code change, which
    # re-runs every variant by design: an ablation table compares variants of one code version.
    fingerprint = {**fingerprint, "config": run_fingerprint(config)}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("status") == "done" and record.get("fingerprint") == fingerprint:
            log.info("variant %s: done already, skipped", name)
            return {**record, "skipped": True}
        if record.get("status") == "done":
            # finished by other code (or settings): resuming it would train nothing and keep those weights
            stale = output / STALE / f"{name}-{(record.get('fingerprint') or {}).get('code', 'unknown')}"
            stale.parent.mkdir(exist_ok=True)
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(run_dir, stale)
            log.warning("variant %s: finished by another code version or settings; moved to %s, training again",
                        name, stale)
    log.info("variant %s: training", name)
    started = time.time()
    rc = run_train(config, output=run_dir, cache=cache, vocab=vocab)
    record = {
        "format": VARIANT_FORMAT, "version": VARIANT_VERSION, "name": name, "overrides": overrides,
        "seed": config.train.seed, "fingerprint": fingerprint, "status": "done" if rc == 0 else f"failed ({rc})",
        "wall_s": round(time.time() - started, 1), "metrics": (run_format.read_metrics(run_dir) or [{}])[-1],
    }
    tmp = record_path.with_name(".variant.json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, record_path)
    return {**record, "skipped": False}


def run_ablate(config, *, cache: str, output: str | Path, grid: dict[str, list[Any]], vocab: str | None = None,
               parallel: int = 1, overwrite: bool = False, bench_prompts: list[str] | None = None) -> int:
    """Train every variant of ``grid`` (``parse_grid``) over ``config`` from one ``cache`` into ``output``,
    skipping finished ones; with ``bench_prompts`` (prompt set names or files) export them all and measure
    them in vLLM together (train/ablation_bench.py); writes the results table and plots. ``overwrite`` as
    `--overwrite`."""
    from eaglecache import outputs
    from eaglecache.formats.cache_reader import is_url
    from eaglecache.train.ablation_report import write_report
    from eaglecache.train.launch import signal_name
    from eaglecache.train.signals import forwarding_signals

    outputs.claim_output(output, overwrite, "ablate", outputs.ablation)
    if not cache or not (is_url(cache) or Path(cache).is_dir()):
        raise UserError(f"--cache {cache}: not a directory or URL (a feature cache from `eaglecache precompute`)")
    if config.train.source != "cache":
        raise UserError("ablations train from the cache: train.source must be 'cache'")
    variants = expand(grid)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fingerprint = {"cache": cache_fingerprint(cache), "code": code_version()}
    print(f"{len(variants)} variants from {cache} into {output}")

    with forwarding_signals() as stopped:  # a stop reaches every running variant's ranks (train/signals.py)
        def job(overrides):  # each variant's launcher picks its own free rendezvous port
            if stopped:
                return None
            return run_variant(config, overrides, cache=cache, output=output, vocab=vocab, fingerprint=fingerprint)

        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            records = list(pool.map(job, variants))
    if stopped:
        print(f"\nerror: stopped by {signal_name(stopped[0])}; run the same command again to resume: finished "
              f"variants are kept, stopped ones resume from their last checkpoint", file=sys.stderr)
        return 128 + stopped[0]
    failed = [r["name"] for r in records if r["status"] != "done"]
    summary = (f"{sum(r['skipped'] for r in records)} skipped (done before), "
               f"{sum(not r['skipped'] for r in records) - len(failed)} trained, {len(failed)} failed")
    measured = None
    if bench_prompts and not failed:
        from eaglecache.train.ablation_bench import export_and_bench, vllm_rows

        results = export_and_bench(output, records, bench_prompts, config.identity("target", "serve"))
        measured = vllm_rows(results, [r["name"] for r in records])
    table = write_report(output, records, list(grid), measured)
    print(table)
    print(summary)
    if failed:
        raise UserError(f"variants failed: {', '.join(failed)} (see their run directories)")
    return 0
