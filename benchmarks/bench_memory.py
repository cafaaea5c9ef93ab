"""Training memory: train/memory.py's model next to the peak measured in a real training run, at two sizes.

Each size runs the real trainer (``eaglecache.train.main.train``: DeepSpeed ZeRO-3 on one CPU rank, the
streaming loader over a Zarr cache written by precompute's writer, the TTT loss with gradient
checkpointing, bf16, ``split`` attention as on CPU) for 2 steps in a child process of its own, under
torch's profiler with ``profile_memory``. What is measured is the CPU allocator's live bytes: every
allocation and free torch's CPU allocator reports, summed in time order from before the model is built;
the peak of that sum is the run's peak. Not counted: Python objects, numpy buffers, the libraries
themselves (what RSS would add as a baseline), and allocations made on other threads (so the loader
runs with 0 workers, one micro-batch at a time, and the model is given the same). On a CPU the
micro-batch is the one in "device" memory, so it is counted once.

The run also marks the start of the last step's forward (an allocation of a size nothing else uses):
live bytes there are the static part (frozen head, ZeRO-3 states with AdamW's moments, the reduce bucket,
the micro-batch), the rise above it to the peak the dynamic part (the draft gathered by ZeRO-3 for its
forward, the TTT unroll and the working set);
both are set against the model's rows. The target: the model within 15 % of each measured peak.

    python benchmarks/bench_memory.py                          # T 1024 and 4096, hidden 1024, vocab 32000
    python benchmarks/bench_memory.py --seq 512 2048 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from synthetic import free_port, make_target_and_cache  # benchmarks/ is on sys.path: scripts run from it

MARKER_ELEMENTS = 1_234_567  # int8: an allocation size nothing in the step makes


def child(args) -> dict:
    import logging

    import torch
    from torch.profiler import ProfilerActivity, profile

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(args.port), "DS_ACCELERATOR": "cpu"})
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from eaglecache.config import load_config
    from eaglecache.formats.cache_reader import open_cache
    from eaglecache.target import target_config
    from eaglecache.train import memory
    from eaglecache.train.deepspeed_engine import init_distributed
    from eaglecache.train.draft import Eagle3Draft
    from eaglecache.train.main import train

    seq, work = args.seq[0], Path(args.workdir)
    target, cache = make_target_and_cache(work, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                                          kv_heads=args.kv_heads, vocab=args.vocab, seq=seq, num_samples=2,
                                          chunk_tokens=256, head_dtype="bfloat16", max_positions=2 * seq + 64)
    rank, world, device = init_distributed()
    config = load_config(None, [
        f"target.path={target}", "train.dtype=bfloat16", "train.global_batch_size=1", "train.micro_batch_size=1",
        f"train.max_seq_length={seq}", f"train.ttt_length={args.ttt}", "train.gradient_checkpointing=true",
        "train.loader_workers=0", "train.log_interval=1", "train.checkpoint_interval=1000000", "train.max_steps=2",
        f"train.loss_chunk_tokens={args.loss_chunk_tokens}"])
    forward = Eagle3Draft.forward

    def marked_forward(self, *inputs):
        torch.empty(MARKER_ELEMENTS, dtype=torch.int8)  # allocated and freed: its event marks the time
        return forward(self, *inputs)

    Eagle3Draft.forward = marked_forward
    (work / "run").mkdir()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train(config, work / "run", open_cache(cache), target_dir=target, rank=rank, world_size=world, device=device)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live, peak, marks, peak_ns = 0, 0, [], 0
    for ns, nbytes in events:
        if nbytes == MARKER_ELEMENTS:
            marks.append(live)
            peak = live  # the peak of the last step, from its start
        live += nbytes
        if live > peak:
            peak, peak_ns = live, ns
    if os.environ.get("BENCH_MEMORY_DEBUG"):  # the ops running when the peak was reached, outermost first
        ops = [e for e in prof.profiler.kineto_results.events() if e.name() != "[memory]"
               and e.start_ns() <= peak_ns <= e.start_ns() + e.duration_ns()]
        print("peak inside: " + " > ".join(e.name() for e in sorted(ops, key=lambda e: e.start_ns())), file=sys.stderr)
    m = memory.memory_inputs(config, target_config(target), world, dtype="bfloat16", attention="split")
    rows = memory.gpu_rows(m, seq)
    return {"seq": seq, "measured_peak": peak, "measured_static": marks[-1], "forwards": len(marks),
            "rows": [(r.name, r.nbytes) for r in rows], "model_peak": sum(r.nbytes for r in rows),
            "model_static": sum(r.nbytes for r in rows[:4]), "params": m.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="sequence lengths, one run each")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ttt", type=int, default=7)
    parser.add_argument("--loss-chunk-tokens", type=int, default=2048)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    import torch

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; hidden {args.hidden}, intermediate {args.intermediate}, "
          f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, TTT {args.ttt}, bf16, checkpointing, 1 rank")
    results = []
    for seq in args.seq:
        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            cmd = [sys.executable, __file__, "--child", "--workdir", tmp, "--port", str(free_port()),
                   "--seq", str(seq)] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                         ("hidden", "intermediate", "heads", "kv_heads", "vocab", "ttt",
                                          "loss_chunk_tokens")]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(out.stderr[-4000:])
            results.append(json.loads(line[len("RESULT "):]))
    gib = 2 ** 30
    for r in results:
        print(f"\nT {r['seq']:,} (draft P {r['params']:,}): model rows, GiB")
        for name, nbytes in r["rows"]:
            print(f"  {name:<30}{nbytes / gib:>8.3f}")
    print(f"\n{'T':>6}  {'part':<8}{'model GiB':>11}{'measured GiB':>14}{'model/measured':>16}")
    worst = 0.0
    for r in results:
        parts = (("static", r["model_static"], r["measured_static"]),
                 ("dynamic", r["model_peak"] - r["model_static"], r["measured_peak"] - r["measured_static"]),
                 ("peak", r["model_peak"], r["measured_peak"]))
        for part, model, measured in parts:
            print(f"{r['seq']:>6,}  {part:<8}{model / gib:>11.3f}{measured / gib:>14.3f}{model / measured:>16.3f}")
        worst = max(worst, abs(r["model_peak"] / r["measured_peak"] - 1))
    print(f"\nworst peak error {worst:.1%} ({'within' if worst <= 0.15 else 'OUTSIDE'} the 15 % target)")


if __name__ == "__main__":
    main()
