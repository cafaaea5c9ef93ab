"""``eaglecache precompute``: one job writes one part of a feature cache from a prepared data set.

The data set is split deterministically into ``num_parts`` contiguous sample
ranges of about equal token counts; job ``part_index`` writes its range into its
part (``parts/part-IIIII-of-NNNNN``, eaglecache/formats/cache.py) of the output
directory, so a job array (any number of nodes) fills one cache that the trainer
reads as one. A job that is
restarted resumes its part: samples already committed are not recomputed.

Faults: the job holds its part's lock (precompute/ownership.py) from before the
engine starts, so a second job on the same part fails at once with one line; a
shard a killed job renamed into place but never recorded is removed before the
part is reopened; a full disk is one error line naming the path and the bytes a
shard needs, and what was committed before stays valid for the rerun.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from eaglecache.errors import UserError
from eaglecache.formats.cache import (
    FP8_DTYPE, LAYER_CONVENTION, SHARD_GLOB, default_chunk_tokens, listed_shards, metadata_bytes_per_token, part_dir,
    part_name,
)

log = logging.getLogger(__name__)


def split_parts(num_tokens: np.ndarray, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sample ranges of about equal tokens: sample s goes to the part whose
    token interval holds its first token. Deterministic; a part may be empty when samples are few."""
    starts = np.cumsum(num_tokens, dtype=np.int64) - num_tokens
    total = int(np.sum(num_tokens, dtype=np.int64))
    cuts = [int(np.searchsorted(starts, total * i / num_parts, side="left")) for i in range(num_parts)]
    cuts.append(len(num_tokens))
    return [(cuts[i], cuts[i + 1]) for i in range(num_parts)]


def cache_metadata(config, dataset, target_path, aux_layer_ids: list[int], num_parts: int,
                   num_samples: int) -> dict[str, Any]:
    """cache.json's metadata (formats.cache.METADATA_KEYS): identical for every job of one cache."""
    import vllm

    from eaglecache import target

    tcfg = target.target_config(target_path)
    pc = config.precompute
    tokenizer_hash, template_hash = target.tokenizer_hash(target_path), target.chat_template_hash(target_path)
    for key, ours in (("tokenizer_hash", tokenizer_hash), ("chat_template_hash", template_hash)):
        theirs = dataset.metadata.get(key)
        if theirs and theirs != ours:
            raise UserError(f"the data set was prepared with another tokenizer or chat template than the "
                            f"target {target_path} ({key} differs): prepare it again with this target")
    return {
        "aux_layer_ids": list(aux_layer_ids),
        "final_layer_id": int(tcfg["num_hidden_layers"]),
        "num_hidden_layers": int(tcfg["num_hidden_layers"]),
        "layer_convention": LAYER_CONVENTION,
        "final_prenorm": True,
        "hidden_size": int(tcfg["hidden_size"]),
        "vocab_size": int(tcfg["vocab_size"]),
        "target_path": str(target_path),
        "target_weights_hash": target.weights_hash(target_path),
        "tokenizer_hash": tokenizer_hash,
        "chat_template_hash": template_hash,
        "dataset_hash": dataset.metadata.get("dataset_hash"),
        "dataset_num_samples": int(num_samples),
        "vllm_version": vllm.__version__,
        "tensor_parallel_size": pc.tensor_parallel_size or config.target.tensor_parallel_size,
        "dtype": FP8_DTYPE if pc.fp8 else "bfloat16",
        "compute_dtype": config.target.compute_dtype(),  # what the target computed in; stored bits are the same kind
        "codec": pc.codec,
        "codec_level": pc.codec_level,
        "chunk_tokens": pc.chunk_tokens or default_chunk_tokens(len(aux_layer_ids), int(tcfg["hidden_size"])),
        "shard_tokens": pc.shard_tokens,
        "num_parts": num_parts,
        "config": config.identity("target", "precompute"),
    }


def _rpc(llm, method: str, *args) -> Any:
    """Call a WriterRPC method on every worker; the writing rank's answer (the others give None)."""
    answers = [a for a in llm.collective_rpc(method, args=args) if a is not None]
    if len(answers) != 1:
        raise RuntimeError(f"{method}: expected one writing worker, got {len(answers)} answers")
    return answers[0]


def _wait_for_writer(llm, expected: int, timeout_s: float = 600.0) -> dict:
    """The engine reports a request finished before its states reach the writer; wait for the rest."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _rpc(llm, "eaglecache_part_status")
        if status["error"]:
            raise WriterFailed(status["error"])
        if status["received"] >= expected:
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"writer got {status['received']} of {expected} samples in {timeout_s:.0f} s")
        time.sleep(0.005)  # the engine is idle by now: a status call costs ~1 ms; the wait is all tail


def resolve_layers(config, target_path) -> tuple[list[int], int]:
    from eaglecache import target

    num_layers = target.target_layer_count(target_path)
    aux = config.precompute.aux_layer_ids or target.default_aux_layer_ids(num_layers)
    return list(aux), num_layers


def resolve_part(config, part_index: int | None = None, num_parts: int | None = None, *,
                 index_flag: str = "--part-index", count_flag: str = "--num-parts") -> tuple[int, int]:
    """(part_index, num_parts) of this job: the given ones, else the config's; refused when out of range
    (the message names the flags as the user spelled them)."""
    pc = config.precompute
    num_parts = pc.num_parts if num_parts is None else num_parts
    part_index = pc.part_index if part_index is None else part_index
    if num_parts < 1 or not 0 <= part_index < num_parts:
        raise UserError(f"{index_flag} {part_index} must be in 0..{num_parts - 1} ({count_flag} {num_parts})")
    return part_index, num_parts


def run_precompute(config, *, data: str | Path, output: str | Path, part_index: int | None = None,
                   num_parts: int | None = None, limit: int | None = None, llm=None) -> int:
    """Write part ``part_index`` of ``num_parts`` (default: the config's) of the cache at ``output`` from
    the prepared data set ``data``, its first ``limit`` samples only when given. ``llm``: an engine
    from ``build_engine`` to reuse (tests)."""
    from eaglecache.formats.dataset import open_dataset
    from eaglecache.precompute.ownership import PartLock
    from eaglecache.precompute.vllm_engine import build_engine
    from eaglecache.precompute.writer import create_or_check_cache
    from eaglecache.target import resolve_target

    part_index, num_parts = resolve_part(config, part_index, num_parts)
    dataset = open_dataset(data)
    num_samples = len(dataset) if limit is None else min(limit, len(dataset))
    if num_samples == 0:
        raise UserError(f"{data}: no samples to precompute")
    target_path = resolve_target(config)
    aux_layer_ids, num_layers = resolve_layers(config, target_path)
    metadata = cache_metadata(config, dataset, target_path, aux_layer_ids, num_parts, num_samples)
    num_tokens = dataset.num_tokens_array()[:num_samples]
    name = part_name(part_index, num_parts)
    part_path = part_dir(output, part_index, num_parts)
    with disk_full_is_user_error(part_path, shard_bytes(metadata)):
        create_or_check_cache(output, metadata)
        lock = PartLock(output, name).acquire()
    if config.precompute.fp8:
        log.warning("precompute.fp8 is ON: states are stored LOSSY as FP8 e4m3 with a scale per token and layer; "
                    "training from this cache is NOT bit-equivalent to online training")
    own_engine = llm is None
    try:
        drop_unlisted_shards(part_path)
        if own_engine:
            llm = build_engine(config, target_path, aux_layer_ids=aux_layer_ids, num_layers=num_layers)
        with disk_full_is_user_error(part_path, shard_bytes(metadata)):
            return _write_part(llm, config, output, dataset, metadata, num_tokens, part_index, num_parts,
                               engine_is_ours=own_engine)
    finally:
        if own_engine and llm is not None:
            llm.llm_engine.engine_core.shutdown()
        lock.release()


def _write_part(llm, config, output, dataset, metadata, num_tokens, part_index: int, num_parts: int, *,
                engine_is_ours: bool) -> int:
    from tqdm import tqdm

    from eaglecache.precompute.vllm_engine import check_fits, prefill

    pc = config.precompute
    start, stop = split_parts(num_tokens, num_parts)[part_index]
    if stop > start:
        check_fits(llm, int(num_tokens[start:stop].max()))
    opened = _rpc(llm, "eaglecache_open_part", str(output), part_index, num_parts, metadata,
                  [start, stop], pc.max_pending_gib << 30)
    name = part_name(part_index, num_parts)
    if opened["complete"]:
        _rpc(llm, "eaglecache_close_part", True)
        print(f"{name} of {output} is already complete; nothing to do")
        return 0
    committed = set(opened["committed"])
    todo = [s for s in range(start, stop) if s not in committed]
    todo_tokens = int(num_tokens[todo].sum())
    log.info("%s: samples %d..%d (%d to do, %d already committed), %d tokens", name, start, stop - 1,
             len(todo), len(committed), todo_tokens)

    started = time.perf_counter()
    complete = writer_failed = False
    try:
        samples = (s for s in dataset.iter_samples(start, stop) if s["sample_id"] not in committed)
        bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"precompute {name}", dynamic_ncols=True)
        last_poll = 0.0
        for num_tokens in prefill(llm, samples, extract=True, max_in_flight=pc.batch_size):
            bar.update(num_tokens)
            if time.perf_counter() - last_poll > 2.0:
                last_poll = time.perf_counter()
                status = _rpc(llm, "eaglecache_part_status")
                if status["error"]:
                    raise WriterFailed(status["error"])
                bar.set_postfix_str(f"{status['bytes_written'] / 1e9:.2f} GB written")
        bar.close()
        _wait_for_writer(llm, len(todo))
        complete = True
    except WriterFailed:
        writer_failed = True
        raise
    finally:
        if complete:
            summary = _rpc(llm, "eaglecache_close_part", True)
        elif writer_failed and engine_is_ours:
            pass  # closing would only raise the writer's error again, with vLLM's traceback; the engine goes
        else:  # keep what was committed for the next run; the error that got us here is the one to see
            try:
                _rpc(llm, "eaglecache_close_part", False)
            except Exception as exc:  # the writer's own failure again, already being raised
                log.warning("closing %s after the failure: %s", name, str(exc).splitlines()[0][:300])
    elapsed = time.perf_counter() - started
    _print_summary(name, output, summary, elapsed)
    return 0


class WriterFailed(RuntimeError):
    """The shard writer (in vLLM's worker process) stopped; ``str`` is its exception's repr."""

    def __init__(self, error: str):
        super().__init__(f"hidden-state writer failed: {error}")
        self.error = error


def shard_bytes(metadata: dict) -> int:
    """Upper bound of one shard on disk: ``shard_tokens`` tokens of uncompressed bf16 arrays (also
    bounds an FP8 shard, which takes less)."""
    return int(metadata["shard_tokens"]) * metadata_bytes_per_token(metadata, fp8=False)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC raised here, or reported by the writer in another process (then only its text arrives)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "OSError(28,", "os error 28"))


@contextmanager
def disk_full_is_user_error(part_path: Path, needed: int):
    """Turn ENOSPC into one line: where, how many bytes one shard needs, what is free, what is kept."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        where = part_path if part_path.exists() else part_path.parent.parent
        free = shutil.disk_usage(where).free
        # the writer's error may reach us only as a dead engine: then less room than a shard tells
        if not (_is_disk_full(exc) or free < needed):
            raise
        committed = listed_shards(part_path) or ()
        raise UserError(f"disk full writing {where}: a shard needs up to {needed:,} bytes and {free:,} are free "
                        f"there; the {len(committed)} shards committed before are intact; free space and rerun "
                        "the same command to resume") from None


def drop_unlisted_shards(part_path: Path) -> None:
    """Remove shard directories that part.json does not list: a job killed after renaming a shard into
    place but before recording it leaves one, and its name is the next shard's. Call with the lock held."""
    listed = listed_shards(part_path)
    if listed is None:
        return  # an unreadable manifest: the writer refuses the part, and nothing here is ours to judge
    for path in sorted(part_path.glob(SHARD_GLOB)):
        if path.name not in listed:
            log.warning("%s: removing %s, written by a killed run but never recorded", part_path, path.name)
            shutil.rmtree(path)


def _print_summary(name: str, output, summary: dict, elapsed: float) -> None:
    gb = summary["bytes_written"] / 1e9
    raw_gb = summary["state_bytes"] / 1e9
    print(f"{name} of {output}: {summary['samples']} samples, {summary['tokens']} tokens in {elapsed:.1f} s "
          f"({summary['tokens'] / max(elapsed, 1e-9):,.0f} tokens/s); {summary['num_shards']} shards, "
          f"{gb:.3f} GB on disk for {raw_gb:.3f} GB of states ({raw_gb / max(gb, 1e-12):.2f}x); "
          f"writer busy {summary['write_seconds']:.1f} s")
    if summary["skipped_samples"]:
        ids = [s["sample_id"] for s in summary["skipped_samples"]]
        print(f"skipped {len(ids)} samples with NaN/Inf states (listed in part.json): {ids[:20]}"
              + (" ..." if len(ids) > 20 else ""))
