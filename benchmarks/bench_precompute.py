"""Precompute throughput against its baselines, all measured in this one run.

1. Prefill: tokens/s of plain vLLM prefill (max_tokens=1, no extraction) and of
   precompute (extraction + connector + Zarr writer, until the part is committed),
   on the same data, both engines alive at once and measured alternately.
   Target: precompute >= 0.85x plain.
2. Writer: GB/s of the shard writer (PartWriter, fsync'ed, MiniMax-M3-sized rows:
   3 aux + final layers of hidden 6144) next to the disk's sequential write GB/s of
   the same bytes (64 MiB writes into one file, as the writer's, then fdatasync: buffered as dd does,
   and O_DIRECT as dd oflag=direct does; the disk figure is the faster), both after
   the same warm-up volume, alternately on the same file system; dd from /dev/zero
   is printed for reference. Target: writer (codec none) >= 0.8x disk in
   steady state, i.e. after the two warm-up shards that fault in its buffers (the
   cold figure, which counts them, is printed next to it).
3. Size: bytes per token on disk per codec against raw bf16, on the target's
   real states from step 1.

    python benchmarks/bench_precompute.py [--target DIR] [--samples 128] [--tokens 512] [--write-gb 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_dataset(path: Path, vocab: int, num_samples: int, num_tokens: int, target) -> None:
    from eaglecache.data.writer import write_dataset
    from eaglecache.target import chat_template_hash, tokenizer_hash

    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, vocab, num_tokens).astype(np.int32),
             "loss_mask": (np.arange(num_tokens) >= num_tokens // 3).astype(np.uint8),
             "source": "bench", "record_index": i, "content_hash": f"bench-{i}"} for i in range(num_samples)]
    write_dataset(path, rows, {"target_path": str(target), "tokenizer_hash": tokenizer_hash(target),
                               "chat_template_hash": chat_template_hash(target), "config": {}})


def bench_prefill(config, target, data: Path, work: Path, reps: int) -> dict:
    from eaglecache.formats.dataset import open_dataset
    from eaglecache.precompute.vllm_engine import build_engine, prefill
    from eaglecache.precompute.run import resolve_layers, run_precompute

    aux, num_layers = resolve_layers(config, target)
    plain = build_engine(config, target, extract=False)
    extract = build_engine(config, target, aux_layer_ids=aux, num_layers=num_layers)
    dataset = open_dataset(data)
    samples = list(dataset.iter_samples())
    total = sum(len(s["input_ids"]) for s in samples)
    batch = config.precompute.batch_size

    def run_plain() -> float:
        started = time.perf_counter()
        assert sum(prefill(plain, samples, extract=False, max_in_flight=batch)) == total
        return total / (time.perf_counter() - started)

    def run_extract(rep: int) -> float:
        started = time.perf_counter()
        run_precompute(config, data=data, output=work / f"cache-{rep}", llm=extract)
        return total / (time.perf_counter() - started)

    run_plain(), run_extract(-1)  # warm-up (compilation, allocator)
    plain_tps, extract_tps = [], []
    for rep in range(reps):
        plain_tps.append(run_plain())
        extract_tps.append(run_extract(rep))
    return {"tokens": total, "plain": statistics.median(plain_tps), "precompute": statistics.median(extract_tps),
            "plain_all": plain_tps, "precompute_all": extract_tps, "cache": work / "cache-0"}


# the writer measurement's rows: MiniMax-M3-sized states, 2048-token samples, 4 samples a shard
HIDDEN, NUM_AUX, SAMPLE_TOKENS, SHARD_TOKENS = 6144, 3, 2048, 8192
BYTES_PER_SAMPLE = SAMPLE_TOKENS * (NUM_AUX + 1) * HIDDEN * 2
NUM_WARMUP_SAMPLES = 2 * (SHARD_TOKENS // SAMPLE_TOKENS)  # two shards: see writer_gbps
WARMUP_GB = NUM_WARMUP_SAMPLES * BYTES_PER_SAMPLE / 1e9


def dd_zero_gbps(directory: Path, gb: float) -> float:
    """dd of ``gb`` GB from /dev/zero, flushed (conv=fdatasync): the usual disk figure, for reference.
    Zeros flatter disks that compress or skip them (this VM's: ~2 GB/s for zeros, less for states)."""
    count = max(1, int(gb * 1e9 / (16 << 20)))
    try:
        out = subprocess.run(["dd", "if=/dev/zero", f"of={directory / 'dd.bin'}", "bs=16M", f"count={count}",
                              "conv=fdatasync"], capture_output=True, text=True, check=True).stderr
    finally:
        (directory / "dd.bin").unlink(missing_ok=True)
    return count * (16 << 20) / float(re.search(r"copied, ([\d.]+) s", out).group(1)) / 1e9


def disk_write_gbps(directory: Path, gb: float) -> dict[str, float]:
    """The disk baseline: sequential write of ``gb`` GB of the writer measurement's own bytes into one
    file, in writes of the writer's size, flushed (fdatasync), after the same untimed warm-up volume; ``buffered``
    through the page cache (dd) and ``direct`` with O_DIRECT (dd oflag=direct, when the file system
    takes it), since the writer uses the latter.

    Same bytes, same process set-up, same warm-up: virtual disks here change speed with content
    (zeros are cheap) and with what was written just before."""
    return _in_fresh_process("--disk-only", str(gb), str(directory))


def writer_gbps(directory: Path, gb: float, codec: str) -> dict[str, float]:
    """GB/s of states into PartWriter writing ~``gb`` GB of bf16 rows, fsync'ed shards included:
    ``steady`` after two warm-up shards, ``cold`` counting them (and the writer's start) too.

    The first two shards fault in the writer's two shard buffers (a page fault per 4 KiB, a
    one-time cost a job pays once, not per shard), so ``steady`` is what a long precompute sees."""
    return _in_fresh_process("--writer-only", codec, str(gb), str(directory))


def _in_fresh_process(*args: str) -> dict[str, float]:
    """Run this file's ``args`` mode in a new process with the environment vLLM's worker gets
    (build_engine sets it), since the writer lives in that worker."""
    from eaglecache.precompute.vllm_engine import enable_malloc_hugepages

    env = dict(os.environ)
    enable_malloc_hugepages(env)
    out = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _sample_states() -> torch.Tensor:
    """One sample's states [SAMPLE_TOKENS, NUM_AUX + 1, HIDDEN] bf16, the same in every process."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(SAMPLE_TOKENS, NUM_AUX + 1, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16)


def _disk_only(gb: float, directory: Path) -> dict[str, float]:
    from eaglecache.precompute.shardfile import WRITE_BYTES, aligned_empty

    piece = WRITE_BYTES
    states = _sample_states().view(torch.int16).numpy()
    data = aligned_empty(states.shape, states.dtype)  # O_DIRECT wants an aligned buffer
    data[...] = states
    data = memoryview(data).cast("B")[: data.nbytes // piece * piece]  # whole pieces: O_DIRECT lengths

    def write(path: Path, num_bytes: int, direct: bool) -> float:
        num_bytes = max(piece, num_bytes // piece * piece)
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
        try:
            written = 0
            while written < num_bytes:
                offset = written % len(data)
                written += os.write(fd, data[offset:offset + min(piece, num_bytes - written)])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return num_bytes / (time.perf_counter() - started) / 1e9

    result = {}
    try:
        for mode in ("buffered", "direct"):
            try:
                write(directory / "disk-warmup.bin", int(WARMUP_GB * 1e9), mode == "direct")
                result[mode] = write(directory / "disk.bin", int(gb * 1e9), mode == "direct")
            except OSError:  # a file system without O_DIRECT
                pass
        return result
    finally:
        for name in ("disk-warmup.bin", "disk.bin"):
            (directory / name).unlink(missing_ok=True)


def _writer_only(codec: str, gb: float, directory: Path) -> dict[str, float]:
    from eaglecache.precompute.writer import PartWriter

    num_warmup = NUM_WARMUP_SAMPLES
    num_samples = max(1, int(gb * 1e9 / BYTES_PER_SAMPLE))
    states = _sample_states()
    ids, mask = np.arange(SAMPLE_TOKENS, dtype=np.int32), np.ones(SAMPLE_TOKENS, np.uint8)
    meta = {"aux_layer_ids": list(range(NUM_AUX)), "hidden_size": HIDDEN, "dtype": "bfloat16", "codec": codec,
            "codec_level": 1, "chunk_tokens": 512, "shard_tokens": SHARD_TOKENS, "num_parts": 1}
    cache = directory / f"writer-{codec}"
    started = time.perf_counter()
    writer = PartWriter(cache, 0, 1, meta)
    for sid in range(num_warmup):
        writer.add(sid, ids, mask, states[:, :NUM_AUX], states[:, NUM_AUX])
    writer.flush()
    warm = time.perf_counter()
    for sid in range(num_warmup, num_warmup + num_samples):
        writer.add(sid, ids, mask, states[:, :NUM_AUX], states[:, NUM_AUX])
    writer.close()
    done = time.perf_counter()
    shutil.rmtree(cache)
    return {"steady": num_samples * BYTES_PER_SAMPLE / (done - warm) / 1e9,
            "cold": (num_warmup + num_samples) * BYTES_PER_SAMPLE / (done - started) / 1e9}


def bytes_per_token(cache_path: Path, work: Path) -> list[tuple[str, float]]:
    """Rewrite the real states of a cache with each codec; bytes on disk per token."""
    from eaglecache.formats.cache_reader import open_cache
    from eaglecache.precompute.writer import PartWriter

    source = open_cache(cache_path)
    meta = dict(source.metadata)
    rows = []
    for label, codec, dtype in (("none", "none", "bfloat16"), ("zstd-1", "zstd", "bfloat16"),
                                ("blosc-zstd-1", "blosc-zstd", "bfloat16"), ("fp8+zstd-1 (LOSSY)", "zstd", "fp8_e4m3")):
        out = work / f"codec-{label.split()[0]}"
        writer = PartWriter(out, 0, 1, {**meta, "codec": codec, "codec_level": 1, "dtype": dtype})
        for sid in source.sample_ids:
            s = source.read(sid)
            writer.add(sid, s.input_ids, s.loss_mask, s.aux, s.final)
        record = writer.close()
        rows.append((label, sum(s["nbytes"] for s in record["shards"]) / source.total_tokens))
        shutil.rmtree(out)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--writer-only"]:
        codec, gb, directory = sys.argv[2:5]
        print(json.dumps(_writer_only(codec, float(gb), Path(directory))))
        return
    if sys.argv[1:2] == ["--disk-only"]:
        print(json.dumps(_disk_only(float(sys.argv[2]), Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="HF target directory (default: the embedded tiny target)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sample")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--write-gb", type=float, default=2.0, help="GB per writer / dd measurement")
    parser.add_argument("--dir", help="scratch directory on the disk to measure (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. target.kv_cache_gib=0.25")
    args = parser.parse_args()

    from eaglecache.config import load_config
    from eaglecache.formats.shard_meta import use_fast_codec_pipeline
    from eaglecache.target import resolve_target, target_config

    # shards of 1/8 of the data, so that writing overlaps the prefill as it does in a long run
    config = load_config(None, ["target.kv_cache_gib=0.25", f"data.max_seq_length={max(args.tokens, 512)}",
                                f"precompute.shard_tokens={max(args.samples * args.tokens // 8, 1)}",
                                *args.overrides] + ([f"target.path={args.target}"] if args.target else []))
    target = resolve_target(config)
    work = Path(tempfile.mkdtemp(prefix="bench-precompute-", dir=args.dir))
    try:
        print(f"zarrs codec pipeline: {'yes' if use_fast_codec_pipeline() else 'NO (pip install zarrs)'}")
        make_dataset(work / "data", target_config(target)["vocab_size"], args.samples, args.tokens, target)
        prefill = bench_prefill(config, target, work / "data", work, args.reps)
        disk, zeros, writer = [], [], {c: [] for c in ("none", "zstd", "blosc-zstd")}
        for _ in range(args.reps):  # alternate: the disk and the cores are shared
            zeros.append(dd_zero_gbps(work, args.write_gb))
            disk.append(disk_write_gbps(work, args.write_gb))
            for codec in writer:
                writer[codec].append(writer_gbps(work, args.write_gb, codec))
        sizes = bytes_per_token(prefill["cache"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = prefill["precompute"] / prefill["plain"]
    print(f"\n== prefill: {args.samples} samples x {args.tokens} tokens, {target}, median of {args.reps}")
    print(f"plain vLLM prefill   {prefill['plain']:10,.0f} tokens/s   {[round(x) for x in prefill['plain_all']]}")
    print(f"precompute           {prefill['precompute']:10,.0f} tokens/s   {[round(x) for x in prefill['precompute_all']]}")
    print(f"ratio                {ratio:10.2f}x   (target >= 0.85x: {'PASS' if ratio >= 0.85 else 'FAIL'})")
    print(f"\n== writer: {args.write_gb} GB of [tokens, 4, 6144] bf16 per measurement (after {WARMUP_GB:.1f} GB of warm-up), "
          f"median of {args.reps}")
    disk_by_mode = {mode: [d[mode] for d in disk if mode in d] for mode in ("buffered", "direct")}
    for mode, figures in disk_by_mode.items():
        if figures:
            print(f"disk sequential write of the same bytes, {mode:<8} (64 MiB writes, fdatasync)  "
                  f"{statistics.median(figures):6.2f} GB/s   {[round(x, 2) for x in figures]}")
    disk = [max(d.values()) for d in disk]  # the disk's figure: the faster way to write it
    disk_gbps = statistics.median(disk)
    print(f"disk (the faster of the two, per round)  {disk_gbps:6.2f} GB/s   {[round(x, 2) for x in disk]}")
    print(f"dd from /dev/zero (fdatasync), for reference  {statistics.median(zeros):6.2f} GB/s   "
          f"{[round(x, 2) for x in zeros]}")
    print(f"writer none / disk, per round          {[round(w['steady'] / d, 2) for w, d in zip(writer['none'], disk)]}")
    for codec, results in writer.items():
        steady = statistics.median(r["steady"] for r in results)
        cold = statistics.median(r["cold"] for r in results)
        verdict = f"{steady / disk_gbps:.2f}x disk" + (
            f" (target >= 0.8x: {'PASS' if steady >= 0.8 * disk_gbps else 'FAIL'})" if codec == "none" else "")
        print(f"writer {codec:<10} {steady:6.2f} GB/s of states in   {verdict}   "
              f"(cold, warm-up and start included: {cold:.2f} GB/s)")
    raw = sizes[0][1]
    print("\n== bytes per token on the target's real states (raw bf16 = codec none)")
    for label, size in sizes:
        print(f"{label:<20} {size:10,.1f} bytes/token   {raw / size:5.2f}x smaller than raw bf16")


if __name__ == "__main__":
    main()
