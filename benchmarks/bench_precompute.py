"""Precompute throughput against its baselines, all measured in this one run.

1. Prefill: tokens/s of plain vLLM prefill (max_tokens=1, no extraction) and of
   precompute (extraction + connector + Zarr writer, until the part is committed),
   on the same data, both engines alive at once and measured alternately.
   Target: precompute >= 0.85x plain.
2. Writer: GB/s of the shard writer (PartWriter, fsync'ed, MiniMax-M3-sized rows:
   3 aux + final layers of hidden 6144) next to the disk's sequential write GB/s
   (dd with conv=fdatasync), alternately on the same file system. Target: writer
   (codec none) >= 0.8x disk.
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
    from eaglecache.data.schema import write_dataset
    from eaglecache.target import chat_template_hash, tokenizer_hash

    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(0, vocab, num_tokens).astype(np.int32),
             "loss_mask": (np.arange(num_tokens) >= num_tokens // 3).astype(np.uint8),
             "source": "bench", "record_index": i, "content_hash": f"bench-{i}"} for i in range(num_samples)]
    write_dataset(path, rows, {"target_path": str(target), "tokenizer_hash": tokenizer_hash(target),
                               "chat_template_hash": chat_template_hash(target), "config": {}})


def bench_prefill(config, target, data: Path, work: Path, reps: int) -> dict:
    from eaglecache.data.schema import open_dataset
    from eaglecache.precompute.engine import build_engine, prefill
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
        args = argparse.Namespace(input=str(data), output=str(work / f"cache-{rep}"), shard_index=None,
                                  num_shards=None, limit=None)
        started = time.perf_counter()
        run_precompute(config, args, llm=extract)
        return total / (time.perf_counter() - started)

    run_plain(), run_extract(-1)  # warm-up (compilation, allocator)
    plain_tps, extract_tps = [], []
    for rep in range(reps):
        plain_tps.append(run_plain())
        extract_tps.append(run_extract(rep))
    return {"tokens": total, "plain": statistics.median(plain_tps), "precompute": statistics.median(extract_tps),
            "plain_all": plain_tps, "precompute_all": extract_tps, "cache": work / "cache-0"}


def disk_write_gbps(directory: Path, gb: float) -> float:
    """Sequential write of ``gb`` GB with dd, flushed to disk (conv=fdatasync)."""
    target = directory / "dd.bin"
    count = max(1, int(gb * 1e9 / (16 << 20)))
    out = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fdatasync"],
                         capture_output=True, text=True, check=True).stderr
    target.unlink()
    seconds = float(re.search(r"copied, ([\d.]+) s", out).group(1))
    return count * (16 << 20) / seconds / 1e9


def writer_gbps(directory: Path, gb: float, codec: str, hidden: int = 6144, num_aux: int = 3) -> tuple[float, float]:
    """(input GB/s, on-disk GB/s) of PartWriter writing ~``gb`` GB of bf16 rows, fsync'ed shards included.

    Runs in a fresh process started with the environment vLLM's worker gets (build_engine sets it),
    since the writer lives in that worker."""
    from eaglecache.precompute.engine import enable_malloc_hugepages

    env = dict(os.environ)
    enable_malloc_hugepages(env)
    out = subprocess.run([sys.executable, __file__, "--writer-only", codec, str(gb), str(directory), str(hidden),
                          str(num_aux)], env=env, capture_output=True, text=True, check=True).stdout
    gbps_in, gbps_out = json.loads(out.strip().splitlines()[-1])
    return gbps_in, gbps_out


def _writer_only(codec: str, gb: float, directory: Path, hidden: int, num_aux: int) -> tuple[float, float]:
    from eaglecache.precompute.store import PartWriter

    sample_tokens, shard_tokens = 2048, 8192
    bytes_per_token = (num_aux + 1) * hidden * 2
    num_samples = max(1, int(gb * 1e9 / (sample_tokens * bytes_per_token)))
    gen = torch.Generator().manual_seed(0)
    states = (torch.randn(sample_tokens, num_aux + 1, hidden, generator=gen) * 0.5).to(torch.bfloat16)
    ids, mask = np.arange(sample_tokens, dtype=np.int32), np.ones(sample_tokens, np.uint8)
    meta = {"aux_layer_ids": list(range(num_aux)), "hidden_size": hidden, "dtype": "bfloat16", "codec": codec,
            "codec_level": 1, "chunk_tokens": 512, "shard_tokens": shard_tokens, "num_parts": 1}
    cache = directory / f"writer-{codec}"
    started = time.perf_counter()
    writer = PartWriter(cache, 0, 1, meta)
    for sid in range(num_samples):
        writer.add(sid, ids, mask, states[:, :num_aux], states[:, num_aux])
    record = writer.close()
    seconds = time.perf_counter() - started
    on_disk = sum(s["nbytes"] for s in record["shards"])
    shutil.rmtree(cache)
    return num_samples * sample_tokens * bytes_per_token / seconds / 1e9, on_disk / seconds / 1e9


def bytes_per_token(cache_path: Path, work: Path) -> list[tuple[str, float]]:
    """Rewrite the real states of a cache with each codec; bytes on disk per token."""
    from eaglecache.precompute.reader import open_cache
    from eaglecache.precompute.store import PartWriter

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
        codec, gb, directory, hidden, num_aux = sys.argv[2:7]
        print(json.dumps(_writer_only(codec, float(gb), Path(directory), int(hidden), int(num_aux))))
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
    from eaglecache.precompute.store import use_fast_codec_pipeline
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
        disk, writer = [], {c: [] for c in ("none", "zstd", "blosc-zstd")}
        for _ in range(args.reps):  # alternate: the disk and the cores are shared
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
    disk_gbps = statistics.median(disk)
    print(f"\n== writer: {args.write_gb} GB of [tokens, 4, 6144] bf16 per measurement, median of {args.reps}")
    print(f"disk sequential write (dd, fdatasync)  {disk_gbps:6.2f} GB/s   {[round(x, 2) for x in disk]}")
    print(f"writer none / disk, per round          {[round(w[0] / d, 2) for w, d in zip(writer['none'], disk)]}")
    for codec, results in writer.items():
        gbps_in = statistics.median(r[0] for r in results)
        gbps_out = statistics.median(r[1] for r in results)
        verdict = f"{gbps_in / disk_gbps:.2f}x disk" + (
            f" (target >= 0.8x: {'PASS' if gbps_in >= 0.8 * disk_gbps else 'FAIL'})" if codec == "none" else "")
        print(f"writer {codec:<10} {gbps_in:6.2f} GB/s of states in, {gbps_out:6.2f} GB/s to disk   {verdict}")
    raw = sizes[0][1]
    print("\n== bytes per token on the target's real states (raw bf16 = codec none)")
    for label, size in sizes:
        print(f"{label:<20} {size:10,.1f} bytes/token   {raw / size:5.2f}x smaller than raw bf16")


if __name__ == "__main__":
    main()
