"""Training step time and peak memory of each draft family, EAGLE3 the baseline in the same run.

One process per family (so each peak RSS is its own): the trainer's draft module (train/draft.py or
train/dflash.py) on random features, forward + loss + backward + an AdamW step, timed after a warm-up
step, median of ``--steps``. Same dims for every family (default: hidden 1024, intermediate 2816,
8/2 heads, vocab 8192, sequence 1024, TTT 7, batch 1, fp32). No DeepSpeed: this compares the
families' compute, not the engine. Prints tokens/s, the ratio to EAGLE3 and peak RSS.

    python benchmarks/bench_families.py
    python benchmarks/bench_families.py --seq 256 --hidden 256 --steps 2     # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

FAMILIES = ("eagle3", "eagle3.1", "peagle", "dflash")


def child(args) -> dict:
    import torch

    from eaglecache.formats.draft import DraftArch, family_arch
    from eaglecache.train.dflash import DFlashDraft
    from eaglecache.train.draft import Eagle3Draft
    from eaglecache.train.target_head import TargetHead
    from eaglecache.train.ttt import TTTSettings

    torch.manual_seed(0)
    h, v, t, k, heads = args.hidden, args.vocab, args.seq, args.ttt, args.heads
    target = TargetHead(torch.randn(v, h) * 0.02, torch.ones(h), torch.randn(v, h) * 0.02, 1e-5, torch.float32)
    arch = DraftArch(hidden_size=h, intermediate_size=args.intermediate, num_attention_heads=heads,
                     num_key_value_heads=args.kv_heads, head_dim=h // heads, rms_norm_eps=1e-5, vocab_size=v,
                     draft_vocab_size=v, target_hidden_size=h, target_num_hidden_layers=32, aux_layer_ids=[2, 16, 29],
                     max_position_embeddings=t + k + 1, rope={"rope_theta": 10000.0},
                     **family_arch(args.family, mask_token_id=0))
    settings = TTTSettings(ttt_length=k, loss_chunk_tokens=2048, attention="split")
    draft = (DFlashDraft if args.family == "dflash" else Eagle3Draft)(arch, target, settings)
    draft.init_weights(0)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = (torch.randint(0, v, (1, t)), torch.ones(1, t, dtype=torch.uint8), torch.randn(1, t, 3, h),
             torch.randn(1, t, h))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss, _ = draft(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    return {"family": args.family, "step_s": statistics.median(times), "tokens_per_s": t / statistics.median(times),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "parameters": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--ttt", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.family:
        print(json.dumps(child(args)))
        return
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load {open('/proc/loadavg').read().split()[:3]}")
    print(f"dims: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, seq {args.seq}, TTT/block {args.ttt}, batch 1, fp32, median of {args.steps} steps")
    rows = []
    for family in FAMILIES:
        argv = [sys.executable, __file__, "--family", family] + [a for a in sys.argv[1:]]
        rows.append(json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    base = rows[0]["tokens_per_s"]
    print("| family | step (s) | tokens/s | vs eagle3 | peak RSS (GiB) | trainable parameters |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{r['peak_rss_gib']:.2f} | {r['parameters']:,} |")


if __name__ == "__main__":
    main()
