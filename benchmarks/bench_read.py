"""Reading the cache for training: one epoch cold through the training loader against the disk's own speed.

For one cache (a real one given with ``--cache``, or a synthetic one at MiniMax-M3's hidden size 6144
with chat-like sample lengths, 256..32,768 tokens), all in one run, each pass after dropping the
page cache (root; otherwise the numbers are warm and the table says so):

Each figure is the median of 3 passes.

- ``sequential``: every file of the cache read start to end in 8 MiB reads (``cat``): the disk's speed;
- ``loader``: one epoch through ``StreamingLoader`` (default workers and prefetch; the trainer's own
  plan, every rank of ``--world-size`` in turn), per layout: the cache as given (v1 if it is one), the
  same states converted to format v2 (this release's default), and v2 with ``blosc-zstd``;
- ``speculators``: the same states as speculators' one safetensors file per sample (``FileTransfer``'s
  layout, read by ``hs_connectors.FileTransfer`` when installed, else ``safetensors.torch.load_file``),
  read in the same order with as many threads as the loader has workers;
- device bytes per stored byte (``/proc/self/io`` read_bytes over the bytes of the files read), bytes
  per token on disk, CPU seconds per decoded GB;
- decode scaling: the v2 epoch warm (page cache) with 1..N workers, N = the cores available;
- delivered vs required: what one worker decodes per second against one H100's appetite at the
  MiniMax-M3 config (6,000-13,000 tokens/s at 49,152 bytes/token), and the cores that takes.

    python benchmarks/bench_read.py --cache runs/demo/cache
    python benchmarks/bench_read.py --synthetic-gb 6 --world-size 8
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import drop_page_cache, machine_line, sequential_read  # noqa: E402

from eaglecache.config import load_config  # noqa: E402
from eaglecache.formats.cache_reader import open_cache  # noqa: E402
from eaglecache.train.loader import SamplePlan, StreamingLoader  # noqa: E402

H100_TOKENS_PER_S = (6_000, 13_000)  # one-layer EAGLE3, TTT 7, hidden 6144, 40-50 % MFU (32k..200k draft vocab)
MINIMAX_BYTES_PER_TOKEN = 4 * 6144 * 2


def device_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def files_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_plan(cache, world_size: int, global_batch: int) -> SamplePlan:
    lengths = cache.num_tokens_array()
    return SamplePlan(cache.sample_ids, lengths, seed=0, global_batch_size=global_batch, micro_batch_size=1,
                      world_size=world_size)


def epoch_order(plan: SamplePlan) -> list[list[int]]:
    """Each rank's samples in the order its loader reads them."""
    return [[sid for step in range(plan.steps_per_epoch) for mb in plan.rank_micro_batches(step, rank) for sid in mb]
            for rank in range(plan.world_size)]


def timed(cold: bool, run, repeats: int = 3) -> dict:
    """The median of ``repeats`` passes (by time; the disk and a shared machine drift)."""
    passes = []
    for _ in range(repeats):
        if cold:
            drop_page_cache()
        read0, cpu0, t0 = device_read_bytes(), cpu_seconds(), time.perf_counter()
        tokens = run()
        passes.append({"seconds": time.perf_counter() - t0, "tokens": tokens,
                       "device_bytes": device_read_bytes() - read0, "cpu_s": cpu_seconds() - cpu0})
    return sorted(passes, key=lambda r: r["seconds"])[len(passes) // 2]


def loader_epoch(cache_path: Path, plan: SamplePlan, workers: int, prefetch: int) -> int:
    cache = open_cache(cache_path)
    max_len = int(cache.num_tokens_array().max())
    tokens = 0
    for rank in range(plan.world_size):
        loader = StreamingLoader(cache, plan, rank=rank, max_seq_length=max_len, total_steps=plan.steps_per_epoch,
                                 workers=workers, prefetch=prefetch)
        for _, batches in loader:
            tokens += sum(b.num_tokens for b in batches)
    return tokens


def write_speculators(cache_path: Path, root: Path) -> None:
    from peer_adapters import write_speculators_sample

    cache = open_cache(cache_path)
    for sid in cache.sample_ids.tolist():
        s = cache.read(sid)
        write_speculators_sample(root, sid, {"input_ids": s.input_ids, "aux": s.aux, "final": s.final})


def speculators_epoch(root: Path, order: list[list[int]], workers: int) -> int:
    """speculators' reads of the same samples; each tensor is copied out (as a collate does), since
    safetensors maps the file and a tensor nobody touches is never read from the disk."""
    try:
        from hs_connectors import FileTransfer

        load = FileTransfer(root).get_cached
    except ImportError:
        from peer_adapters import speculators_path
        from safetensors.torch import load_file

        load = lambda sid: load_file(str(speculators_path(root, sid)))  # noqa: E731

    def read(sid: int) -> int:
        tensors = {name: tensor.clone() for name, tensor in load(sid).items()}
        return len(tensors["token_ids"])
    with ThreadPoolExecutor(workers) as pool:
        return sum(sum(pool.map(read, rank_order)) for rank_order in order)


def synthetic_cache(path: Path, gigabytes: float, hidden: int, seed: int = 0) -> Path:
    """A cache of random bf16 states (scaled like a residual stream, so zstd finds real-like slack) at
    ``hidden``, about ``gigabytes`` raw, sample lengths log-normal around 600 tokens (sigma 1.2: a
    mean of ~1,250, one in ten over 2,800) within 256..32,768, as chat data is."""
    from eaglecache.precompute.writer import PartWriter, create_or_check_cache

    if path.exists():  # made by an earlier run (renamed into place only once complete)
        return path
    final_path, path = path, path.with_name(path.name + ".writing")
    shutil.rmtree(path, ignore_errors=True)
    meta = {"aux_layer_ids": [2, 31, 58], "final_layer_id": 61, "final_prenorm": True, "hidden_size": hidden,
            "vocab_size": 200064, "dtype": "bfloat16", "codec": "zstd", "codec_level": 1, "chunk_tokens": 16,
            "shard_tokens": 20000, "num_parts": 1}
    create_or_check_cache(path, meta)
    writer = PartWriter(path, 0, 1, meta)
    gen = torch.Generator().manual_seed(seed)
    budget, sid = gigabytes * 1e9 / (4 * hidden * 2), 0
    while budget > 0:
        t = int(np.clip(np.random.default_rng([seed, sid]).lognormal(np.log(600), 1.2), 256, 32768))
        writer.add(sid, torch.randint(0, 200064, (t,), generator=gen).numpy().astype(np.int32),
                   (torch.rand(t, generator=gen) < 0.6).numpy().astype(np.uint8),
                   (torch.randn(t, 3, hidden, generator=gen) * 4).to(torch.bfloat16),
                   (torch.randn(t, hidden, generator=gen) * 4).to(torch.bfloat16))
        budget -= t
        sid += 1
    writer.close()
    path.rename(final_path)
    return final_path


def convert(source: Path, output: Path, overrides: list[str]) -> Path:
    from eaglecache.precompute.convert import run_convert

    if not output.exists():
        run_convert(load_config(None, overrides), str(source), str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="A cache to read (the demo's: runs/demo/cache).")
    parser.add_argument("--synthetic-gb", type=float, default=0.0, help="Instead, a synthetic cache of this size.")
    parser.add_argument("--hidden", type=int, default=6144, help="Hidden size of the synthetic cache.")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-read"), help="Where converted copies go.")
    parser.add_argument("--world-size", type=int, default=1, help="Ranks whose plans are read, one after another.")
    args = parser.parse_args(argv)
    train = load_config(None).train
    workers, prefetch = train.loader_workers, train.prefetch
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.cache or synthetic_cache(args.work / f"synthetic-h{args.hidden}", args.synthetic_gb, args.hidden)
    given = open_cache(source)
    layouts = {f"loader, as given (v{given.version}, {given.metadata['codec']}, chunk {given.metadata['chunk_tokens']})": source}
    if given.version != 2 or args.cache:
        layouts["loader, v2 zstd (default)"] = convert(source, args.work / f"{source.name}-v2-zstd", [])
    layouts["loader, v2 blosc-zstd"] = convert(source, args.work / f"{source.name}-v2-blosc",
                                               ["precompute.codec=blosc-zstd"])
    layouts["loader, v2 none (uncompressed)"] = convert(source, args.work / f"{source.name}-v2-none",
                                                        ["precompute.codec=none"])
    speculators = args.work / f"{source.name}-speculators"
    if not speculators.exists():
        write_speculators(source, speculators)
    global_batch = min(train.global_batch_size, len(given) // args.world_size) * args.world_size
    plan = make_plan(given, args.world_size, global_batch)
    order = epoch_order(plan)
    cold = drop_page_cache()
    default = layouts["loader, v2 zstd (default)"] if "loader, v2 zstd (default)" in layouts else source

    rows = {"sequential read of the v2 files (cat)": (default, timed(cold, lambda: (sequential_read(default),
                                                                             given.total_tokens)[1]))}
    for name, path in layouts.items():
        rows[name] = (path, timed(cold, lambda p=path: loader_epoch(p, plan, workers, prefetch)))
    rows[f"speculators safetensors per sample, same order, {workers} threads"] = (
        speculators, timed(cold, lambda: speculators_epoch(speculators, order, workers)))

    print(f"\n{machine_line()} | {'cold (page cache dropped)' if cold else 'WARM: not root, page cache kept'}")
    print(f"{len(given)} samples, {given.total_tokens:,} tokens, hidden {given.metadata['hidden_size']}, "
          f"{plan.world_size} rank plan(s), {plan.steps_per_epoch} steps of {global_batch}; loader workers {workers}, "
          f"prefetch {prefetch}")
    seq = rows["sequential read of the v2 files (cat)"][1]
    spec = rows[f"speculators safetensors per sample, same order, {workers} threads"][1]
    print("| reader | tokens/s | vs cat | vs speculators | disk bytes/token | device bytes / stored byte | CPU s/GB decoded |")
    print("|---|---|---|---|---|---|---|")
    decoded_per_token = 4 * given.metadata["hidden_size"] * 2
    for name, (path, r) in rows.items():
        tps = r["tokens"] / r["seconds"]
        stored = files_bytes(path)
        print(f"| {name} | {tps:,.0f} | {tps / (seq['tokens'] / seq['seconds']):.2f}x | "
              f"{tps / (spec['tokens'] / spec['seconds']):.2f}x | {stored / given.total_tokens:,.0f} | "
              f"{r['device_bytes'] / stored:.3f} | {r['cpu_s'] / (r['tokens'] * decoded_per_token / 1e9):.2f} |")

    scaling = {}
    for n in range(1, (os.cpu_count() or 1) + 1):
        loader_epoch(default, plan, n, prefetch)  # warm the page cache
        scaling[n] = timed(False, lambda n=n: loader_epoch(default, plan, n, prefetch))
    one = scaling[1]["tokens"] / scaling[1]["seconds"]
    print("\ndecode scaling, v2 default, warm: " + ", ".join(
        f"{n} worker(s) {r['tokens'] / r['seconds']:,.0f} tokens/s ({r['tokens'] / r['seconds'] / (n * one):.0%} per worker)"
        for n, r in scaling.items()))
    per_core_gbs = one * decoded_per_token / 1e9
    need = [t * MINIMAX_BYTES_PER_TOKEN / 1e9 for t in H100_TOKENS_PER_S]
    print(f"one worker delivers {per_core_gbs:.2f} GB/s decoded = {per_core_gbs * 1e9 / MINIMAX_BYTES_PER_TOKEN:,.0f} "
          f"tokens/s at hidden 6144; one H100 needs {H100_TOKENS_PER_S[0]:,}-{H100_TOKENS_PER_S[1]:,} tokens/s "
          f"({need[0]:.2f}-{need[1]:.2f} GB/s): {need[0] / per_core_gbs:.1f}-{need[1] / per_core_gbs:.1f} cores per GPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
