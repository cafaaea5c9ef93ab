"""Training throughput at the peer's dimensions: tokens/s, data wait, peak memory and MFU.

The real trainer (``eaglecache.train.main.train``: DeepSpeed ZeRO-3 engine, the
streaming loader over a Zarr cache written by precompute's writer, the TTT loss)
runs in a child process per dtype, at the dimensions of a small production-like draft:
hidden 1024, intermediate 2816, 8 heads / 2 KV heads (head 128), vocab 8192,
sequence 2048, TTT 7, batch 1. Features and the frozen head are random (speed
does not depend on their values).

MFU = model FLOPs / step time / matmul peak, the peak measured in the same child
(the fastest of the step's own matmul shapes in the training dtype, best of several,
before and after the steps; the higher is used). On a shared machine wall time counts other people's
work too, and with several threads every small op waits for a descheduled thread:
the run also reports MFU by process CPU time (FLOPs per CPU-second against the
matmul's FLOPs per CPU-second), which ``--threads 1`` makes immune to that. Model FLOPs are counted as section 10 states (matmuls
only, N = batch * seq, d = head size, T = TTT steps):
forward = 2N*3H^2 + T*[2N*(2H*(heads + 2*kv)*d + heads*d*H + 3*H*I + H*V) + 4*b*heads*S^2*d]
          + sum_{k<T} 4N*heads*d*k;  a training step = 3 x forward, less the weight gradient of the
          frozen LM head (T*2N*H*V; the peers train a head of their own and are counted with it).
The peers' steps (SpecForge's ``OnlineEagle3Model`` and speculators' ``Eagle3DraftModel``, sdpa,
plain torch AdamW; benchmarks/peer_adapters.py) are measured in the same run, in a child of their
own, when they are installed (the ``peers`` extra); the targets are >= 55 % MFU and >= 1.1x the
faster peer's tokens/s. benchmarks/peers.py prints the same comparison as one table.

    python benchmarks/bench_train.py                 # fp32 and bf16, 4 timed steps each
    python benchmarks/bench_train.py --dtype bfloat16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import free_port, make_target_and_cache  # benchmarks/ is on sys.path: scripts run from it

DIMS = dict(hidden=1024, intermediate=2816, heads=8, kv_heads=2, vocab=8192, seq=2048, ttt=7, batch=1)


def step_flops(hidden, intermediate, heads, kv_heads, vocab, seq, ttt, batch, head_trained: bool = False) -> float:
    """FLOPs of one training step: 2 per multiply-add of every matmul (fc once; per TTT step q/k/v/o, the MLP,
    the LM head and causal attention over the sequence, plus the extra keys of earlier steps). Backward is 2x
    forward (input and weight gradients) except for a frozen LM head (the target's, shared), which needs the
    input gradient only; ``head_trained`` for drafts that train a head of their own (the peers')."""
    n, d = batch * seq, hidden // heads
    head = 2 * n * hidden * vocab
    per_step = (2 * n * (2 * hidden * (heads + 2 * kv_heads) * d + heads * d * hidden + 3 * hidden * intermediate)
                + 4 * batch * heads * seq * seq * d)
    forward = 2 * n * 3 * hidden ** 2 + ttt * per_step + sum(4 * n * heads * d * k for k in range(ttt))
    return 3.0 * forward + ttt * head * (3.0 if head_trained else 2.0)


# the training step's own matmul shapes at DIMS ([tokens, in] x [in, out]): the LM head, the MLP, a square one
PEAK_SHAPES = ((2048, 1024, 8192), (2048, 1024, 2816), (2048, 2048, 2048))


def matmul_peak(dtype, shapes=PEAK_SHAPES, reps: int = 8) -> tuple[float, float]:
    """(FLOP/s of wall time, FLOP/s of process CPU time) of the fastest of ``shapes`` (the step's own matmuls,
    so the step cannot outrun its peak), best of ``reps`` each after a warm-up, at this process's threads."""
    import torch

    best_wall = best_cpu = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype)
        b = torch.randn(k, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            wall, cpu = time.perf_counter(), time.process_time()
            a @ b
            best_wall = max(best_wall, 2 * m * k * n / (time.perf_counter() - wall))
            best_cpu = max(best_cpu, 2 * m * k * n / max(time.process_time() - cpu, 1e-9))
    return best_wall, best_cpu


def child(args) -> dict:
    """One dtype: train args.steps + 1 steps (the first is warm-up) and measure."""
    import logging

    import torch

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(args.port), "DS_ACCELERATOR": "cpu"})
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from eaglecache.config import load_config
    from eaglecache.formats.cache_reader import open_cache
    from eaglecache.train.deepspeed_engine import init_distributed
    from eaglecache.train.main import train

    from eaglecache.train import metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    peak_before = matmul_peak(dtype)
    rank, world, device = init_distributed()
    # bench-only instrumentation: process CPU time at the end of every step
    cpu_marks: list[float] = []
    add_step_time = metrics.MetricsTracker.add_step_time
    metrics.MetricsTracker.add_step_time = lambda self, *a: (cpu_marks.append(time.process_time()),
                                                             add_step_time(self, *a))[1]
    config = load_config(None, [
        f"train.dtype={args.dtype}", "train.global_batch_size=1", "train.micro_batch_size=1",
        f"train.max_seq_length={DIMS['seq']}", f"train.ttt_length={DIMS['ttt']}", "train.log_interval=1",
        "train.checkpoint_interval=1000000", "train.gradient_checkpointing=false", "train.loader_workers=2",
        f"train.max_steps={args.steps + 1}", f"train.loss_chunk_tokens={args.loss_chunk_tokens}"])
    run_dir = Path(args.workdir) / f"run-{args.dtype}"
    run_dir.mkdir()
    train(config, run_dir, open_cache(Path(args.workdir) / "cache"), target_dir=Path(args.workdir) / "target",
          rank=rank, world_size=world, device=device)
    peak_after = matmul_peak(dtype)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    tokens = sum(r["tokens"] for r in records)
    step_s = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    wait = sum(r["data_wait_fraction"] * r["tokens"] / r["tokens_per_s"] for r in records)
    flops = step_flops(**DIMS)
    peak = max(peak_before[0], peak_after[0])
    cpu_s = cpu_marks[-1] - cpu_marks[0]  # the timed steps (the first mark ends the warm-up step)
    return {"dtype": args.dtype, "steps": len(records), "threads": torch.get_num_threads(),
            "tokens_per_s": tokens / step_s, "step_s": step_s / len(records), "data_wait_fraction": wait / step_s,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "model_gflops_per_s": flops * len(records) / step_s / 1e9,
            "matmul_peak_gflops": [peak_before[0] / 1e9, peak_after[0] / 1e9],
            "mfu": flops * len(records) / step_s / peak,
            "cpu_s_per_step": cpu_s / len(records),
            "cpu_mfu": flops * len(records) / cpu_s / max(peak_before[1], peak_after[1])}


def _peer_tokens_per_s(args) -> dict:
    """dtype -> (tokens/s, model) of the faster installed peer, measured now in a child process ({} if none)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_adapters

    if not any(peer_adapters.peer_versions().values()):
        return {}
    cmd = [sys.executable, __file__, "--peer-child", "--dtype", *args.dtype, "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the peers' training step failed (benchmarks/peer_adapters.py)")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per dtype (after one warm-up step)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_child:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import peer_adapters

        rows, _ = peer_adapters.bench_train(steps=args.steps, dtypes=args.dtype, include_ours=False)
        print("RESULT " + json.dumps({r["dtype"]: max((p["tokens_per_s"], p["model"]) for p in rows
                                                      if p["dtype"] == r["dtype"]) for r in rows}))
        return
    if args.child:
        args.dtype = args.dtype[0]
        print("RESULT " + json.dumps(child(args)))
        return
    flops = step_flops(**DIMS)
    print(f"dims {DIMS}; model FLOPs per step {flops / 1e9:.0f} GFLOP (frozen LM head); "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        make_target_and_cache(Path(tmp), hidden=DIMS["hidden"], intermediate=DIMS["intermediate"], heads=DIMS["heads"],
                              kv_heads=DIMS["kv_heads"], vocab=DIMS["vocab"], seq=DIMS["seq"],
                              num_samples=args.steps + 1, chunk_tokens=1024)
        peers = _peer_tokens_per_s(args)
        for dtype in args.dtype:
            cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--steps", str(args.steps),
                   "--workdir", tmp, "--port", str(free_port()), "--loss-chunk-tokens", str(args.loss_chunk_tokens),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{dtype} run failed")
            r = json.loads(line[len("RESULT "):])
            peer = peers.get(dtype)
            vs_peer = (f"faster peer {peer[1].split(' (')[0]} {peer[0]:.1f}, x{r['tokens_per_s'] / peer[0]:.2f}"
                       if peer else "peers not installed")
            print(f"{dtype:9s} {r['tokens_per_s']:7.1f} tokens/s ({vs_peer}) | "
                  f"step {r['step_s']:.1f} s | data wait {100 * r['data_wait_fraction']:.1f} % | "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB | {r['model_gflops_per_s']:.0f} model GFLOP/s vs matmul "
                  f"peak {max(r['matmul_peak_gflops']):.0f} (before {r['matmul_peak_gflops'][0]:.0f}, after "
                  f"{r['matmul_peak_gflops'][1]:.0f}) -> MFU {100 * r['mfu']:.1f} % (target >= 55 %) | "
                  f"{r['threads']} thread(s), {r['cpu_s_per_step']:.1f} CPU-s per step, MFU by CPU time "
                  f"{100 * r['cpu_mfu']:.1f} %")


if __name__ == "__main__":
    main()
