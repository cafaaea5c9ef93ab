"""Side-by-side benchmark against the peers (speculators 0.9.0, SpecForge 0.2.0): one table, one run.

Every row is measured in the same process run on the same data, so only ratios within one table
mean anything (the machine may be shared):

  (1) feature generation: ``eaglecache precompute`` vs speculators' ``generate-offline-data``
      against a vLLM OpenAI server with the peer's hidden-state connector, lossless and FP8, on the
      tiny target and the same prepared ShareGPT samples: tokens/s, bytes per token on disk, files
      per 1,000 samples (benchmarks/peer_generation.py).
  (2) reading features for training: our cache (``FeatureCache.read``) vs speculators' one
      safetensors file per sample vs SpecForge's one ``torch.save`` file per sample (both written
      here from the same states, in the peers' layouts) vs a plain sequential read of our cache's
      files; cold (page cache dropped before each pass, as root) and warm, in the shuffled order an
      epoch uses and in stored order.
  (3) a training step at hidden 1024 / intermediate 2816 / 8:2 heads / vocab 8192 / seq 2048 /
      TTT 7 / batch 1, fp32 and bf16: our draft's forward + loss + backward + AdamW step vs
      SpecForge's ``OnlineEagle3Model`` and speculators' ``Eagle3DraftModel`` (sdpa), tokens/s and
      MFU against a matmul peak measured in the same run (benchmarks/peer_adapters.py).

  (4) FP8 against bf16 features: bytes per token on disk, and the mean accept length in vLLM of
      an EAGLE3 draft trained from each cache with the same seed and steps
      (benchmarks/fp8_accept.py).

The peers install with ``pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0
specforge==0.2.0 && pip install datasets`` (the ``peers`` extra); a peer that is missing is a
row that says so.

    python benchmarks/peers.py                        # demo-sized read set, full-size train step
    python benchmarks/peers.py --samples 64 --gen-samples 16 --train-seq 128 --train-hidden 64 --train-steps 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_adapters  # noqa: E402  (benchmarks/ is not a package)
import fp8_accept  # noqa: E402
import peer_generation  # noqa: E402

A = 3  # aux layers stored
PREFETCH_AHEAD = 8  # samples hinted ahead of the one being read, in the "+ prefetch" rows


# --------------------------------------------------------------------------- the data


def make_states(num_samples: int, mean_tokens: int, hidden: int, seed: int = 0):
    """Samples of ``mean_tokens`` tokens on average (uniform in [mean/4, 7*mean/4]): ids, mask, aux, final.

    States are bf16 normals scaled like a residual stream, so zstd finds the same slack in the
    exponent bits as in real ones (about 1.25x)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(mean_tokens // 4, 7 * mean_tokens // 4 + 1, (num_samples,), generator=gen)
    for sid, t in enumerate(lengths.tolist()):
        yield sid, dict(
            input_ids=torch.randint(0, 32000, (t,), generator=gen).numpy().astype(np.int32),
            loss_mask=(torch.rand(t, generator=gen) < 0.6).numpy().astype(np.uint8),
            aux=(torch.randn(t, A, hidden, generator=gen) * 4).to(torch.bfloat16),
            final=(torch.randn(t, hidden, generator=gen) * 4).to(torch.bfloat16))


def write_all_layouts(root: Path, num_samples: int, mean_tokens: int, hidden: int, variants: list[tuple[str, int]],
                      shard_tokens: int = 65536) -> dict[str, Path]:
    """Our cache once per (codec, chunk_tokens) variant and the peers' per-sample files, from the same states."""
    from eaglecache.precompute.writer import PartWriter, create_or_check_cache

    out, writers = {}, []
    for codec, chunk_tokens in variants:
        meta = {"aux_layer_ids": [2, 4, 5], "final_layer_id": 8, "final_prenorm": True, "hidden_size": hidden,
                "vocab_size": 32000, "dtype": "bfloat16", "codec": codec, "codec_level": 1,
                "chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens, "num_parts": 1}
        path = out[f"ours {codec}, chunk_tokens {chunk_tokens}"] = root / f"cache-{codec}-{chunk_tokens}"
        create_or_check_cache(path, meta)
        writers.append(PartWriter(path, 0, 1, meta))
    out["speculators"], out["specforge"] = root / "speculators", root / "specforge"
    for sid, s in make_states(num_samples, mean_tokens, hidden):
        for writer in writers:
            writer.add(sid, **s)
        peer_adapters.write_speculators_sample(out["speculators"], sid, s)
        peer_adapters.write_specforge_sample(out["specforge"], sid, s)
    for writer in writers:
        writer.close()
    return out


# --------------------------------------------------------------------------- (2) reading


def drop_page_cache() -> bool:
    """Drop the page cache (root only); False when it cannot be dropped."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _files_bytes(path: Path) -> tuple[list[Path], int]:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return files, sum(f.stat().st_size for f in files)


def sequential_read(path: Path) -> None:
    """Every file under ``path`` read start to end in 8 MiB reads, as ``cat`` or ``dd`` does."""
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            while os.readv(fd, [view]) > 0:
                pass
        finally:
            os.close(fd)


def zarr_reader(path: Path):
    """The read path before issue 15, kept as a row: zarr arrays of each shard (zarrs codec pipeline)."""
    import zarr

    from eaglecache.formats.cache_reader import open_cache

    cache = open_cache(path)
    groups = {}

    def read(sample_id: int) -> int:
        i = cache._find(sample_id)
        shard = int(cache._shard_of[i])
        if shard not in groups:
            groups[shard] = dict(cache.files.open_group(cache.shard_paths[shard]).arrays())
        rows = slice(int(cache._start[i]), int(cache._start[i] + cache._length[i]))
        arrays = [groups[shard][name][rows] for name in ("input_ids", "loss_mask", "aux", "final")]
        return len(arrays[0])
    return read


def readers(layouts: dict[str, Path]) -> list[tuple[str, str, Path, object, bool]]:
    """(name, version label, files read, read(sample_id) -> tokens, also in stored order) per reader present;
    a ``read`` with a ``prefetch`` attribute is given the next samples' ids ahead of time."""
    from eaglecache.formats.cache_reader import open_cache

    out = []
    for key, path in layouts.items():
        if key.startswith("ours"):
            cache = open_cache(path)
            out.append((f"eaglecache FeatureCache.read, {key[5:]}", "this tree", path,
                        lambda sid, cache=cache: len(cache.read(sid).input_ids), True))
            ahead = open_cache(path)
            read_ahead = (lambda sid, cache=ahead: len(cache.read(sid).input_ids))
            read_ahead.prefetch = ahead.prefetch  # bench_reads hints PREFETCH_AHEAD samples ahead of the read
            out.append((f"eaglecache FeatureCache.read + prefetch {PREFETCH_AHEAD} ahead, {key[5:]}", "this tree", path,
                        read_ahead, True))
    first = next(key for key in layouts if key.startswith("ours"))
    out.append((f"previous read path (zarr arrays), {first[5:]}", "zarr", layouts[first], zarr_reader(layouts[first]),
                False))
    for name, (version, read) in peer_adapters.peer_readers(layouts).items():
        out.append((name, version, layouts[name.split()[0]], read, True))
    return out


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Each row's median rates over repeated runs (the rows of every run are in the same order)."""
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for key in ("tokens_per_s", "gb_per_s"):
            row[key] = statistics.median(r[key] for r in rows)
        row["repeats"] = len(rows)
        out.append(row)
    return out


def bench_reads(layouts: dict[str, Path], sample_ids: np.ndarray, seed: int, cold: bool,
                orders: tuple[str, ...] = ("shuffled", "stored")) -> list[dict]:
    """One pass per reader and order (each cold if ``cold``) and a sequential read of each cache; table rows."""
    shuffled = np.random.Generator(np.random.PCG64([seed, 0])).permutation(sample_ids)
    total_tokens = None
    rows = []
    for name, version, disk, read, also_stored in readers(layouts):
        files, nbytes = _files_bytes(disk)
        for order_name, ids in [("shuffled", shuffled)] + ([("stored", sample_ids)] if also_stored else []):
            if order_name not in orders:
                continue
            dropped = drop_page_cache() if cold else None
            prefetch = getattr(read, "prefetch", None)
            start = time.perf_counter()
            if prefetch is None:
                tokens = sum(read(int(s)) for s in ids)
            else:  # what an epoch can do: it knows its order, so it hints the samples it reads next
                prefetch(ids[:PREFETCH_AHEAD])
                tokens = 0
                for k, s in enumerate(ids):
                    if k + PREFETCH_AHEAD < len(ids):
                        prefetch(ids[k + PREFETCH_AHEAD:k + PREFETCH_AHEAD + 1])
                    tokens += read(int(s))
            elapsed = time.perf_counter() - start
            total_tokens = tokens
            rows.append({"reader": name, "version": version, "order": order_name, "cold": cold, "dropped": dropped,
                         "tokens_per_s": tokens / elapsed, "gb_per_s": nbytes / elapsed / 1e9,
                         "bytes_per_token": nbytes / tokens, "files": len(files)})
    for key, path in layouts.items():
        if key.startswith("ours"):
            files, nbytes = _files_bytes(path)
            dropped = drop_page_cache() if cold else None
            start = time.perf_counter()
            sequential_read(path)
            elapsed = time.perf_counter() - start
            rows.append({"reader": f"sequential read (8 MiB reads) of {key[5:]}", "version": "-", "order": "files",
                         "cold": cold, "dropped": dropped, "tokens_per_s": total_tokens / elapsed,
                         "gb_per_s": nbytes / elapsed / 1e9, "bytes_per_token": nbytes / total_tokens,
                         "files": len(files)})
    return rows


def print_read_table(rows: list[dict]) -> None:
    print(f"{'(2) reading features':58s} {'order':9s} {'cache':5s} {'tokens/s':>10s} {'GB/s':>6s} "
          f"{'B/token':>8s} {'files':>6s}  version")
    for r in rows:
        print(f"  {r['reader']:56s} {r['order']:9s} {'cold' if r['cold'] else 'warm':5s} {r['tokens_per_s']:10.0f} "
              f"{r['gb_per_s']:6.3f} {r['bytes_per_token']:8.0f} {r['files']:6d}  {r['version']}")


def machine_line() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return (f"{time.strftime('%Y-%m-%d')} | {model} | torch {torch.__version__} cpu capability "
            f"{torch.backends.cpu.get_cpu_capability()} | {os.cpu_count()} cores visible")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1613, help="samples in the read set (the demo's: 1613)")
    parser.add_argument("--mean-tokens", type=int, default=210)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the read set (the demo target's)")
    parser.add_argument("--ours", default="zstd:1024,zstd:64,none:1024",
                        help="our cache variants as codec:chunk_tokens, comma-separated (the first is the default's)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--gen-samples", type=int, default=128,
                        help="ShareGPT conversations given to data prepare for row (1) (it drops some)")
    parser.add_argument("--gen-max-seq", type=int, default=512, help="data.max_seq_length of row (1)'s samples")
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--warm-only", action="store_true", help="no cold passes (leaves the page cache alone)")
    parser.add_argument("--cold-only", action="store_true", help="no warm passes")
    parser.add_argument("--orders", nargs="+", default=["shuffled", "stored"], choices=["shuffled", "stored"])
    parser.add_argument("--repeat", type=int, default=3, help="read passes per row; the table shows the median")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per model and dtype (after 1 warm-up)")
    parser.add_argument("--train-seq", type=int, default=2048)
    parser.add_argument("--train-hidden", type=int, default=1024)
    parser.add_argument("--train-dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--fp8-data", default=None, metavar="DIR",
                        help="row (4)'s prepared data set, e.g. the demo's runs/demo/dataset (default: --gen-samples "
                             "ShareGPT first exchanges prepared here)")
    parser.add_argument("--fp8-steps", type=int, default=200, help="row (4): training steps of each draft")
    parser.add_argument("--fp8-max-prompts", type=int, default=100, help="row (4): prompts per set in vLLM")
    parser.add_argument("--workdir", default=None,
                        help="where the read set and row (4)'s caches, runs and drafts are written (default: temp "
                             "dirs); row (4)'s commands resume their own work there, so a rerun is cheap")
    args = parser.parse_args(argv)
    print(machine_line())
    if not args.skip_generation:
        with tempfile.TemporaryDirectory(prefix="bench-peers-gen-", dir=args.workdir) as tmp:
            peer_generation.print_generation_table(peer_generation.bench_generation(
                Path(tmp), args.gen_samples, args.gen_max_seq))
    if not args.skip_reads:
        with tempfile.TemporaryDirectory(prefix="bench-peers-", dir=args.workdir) as tmp:
            variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.ours.split(",")]
            layouts = write_all_layouts(Path(tmp), args.samples, args.mean_tokens, args.hidden, variants)
            ids = np.arange(args.samples, dtype=np.int64)
            orders = tuple(args.orders)
            runs = []
            for _ in range(args.repeat):
                rows = [] if args.warm_only else bench_reads(layouts, ids, seed=0, cold=True, orders=orders)
                runs.append(rows + ([] if args.cold_only else bench_reads(layouts, ids, seed=0, cold=False,
                                                                          orders=orders)))
            rows = median_rows(runs)
            print(f"read set: {args.samples} samples, {args.mean_tokens} tokens on average, hidden {args.hidden}, "
                  f"{A} aux + final, bf16; ours level 1, 65536-token shards; one thread; median of {args.repeat}; page cache "
                  f"{'not dropped (--warm-only)' if args.warm_only else 'dropped before each cold pass' if rows[0]['dropped'] else 'NOT dropped (needs root)'}")
            print_read_table(rows)
    if not args.skip_train:
        peer_adapters.print_train_table(peer_adapters.bench_train(
            steps=args.train_steps, seq=args.train_seq, hidden=args.train_hidden, dtypes=args.train_dtypes))
    if not args.skip_fp8:
        with tempfile.TemporaryDirectory(prefix="bench-peers-fp8-", dir=args.workdir) as tmp:
            work = Path(args.workdir) / "fp8" if args.workdir else Path(tmp)
            fp8_accept.print_fp8_table(fp8_accept.bench_fp8(
                work, Path(args.fp8_data) if args.fp8_data else None, args.gen_samples, args.fp8_steps,
                args.fp8_max_prompts, 256, ["humaneval", "sharegpt-heldout"], []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
