"""Peak memory of the chunked TTT loss on one long sequence: T=16384 positions, vocab 200064 (MiniMax-M3's).

Runs the trainer's own loss (``LMHeadLoss`` of train/loss.py: the frozen target LM
head shared by the draft, 7 TTT steps, soft cross-entropy against the target's
softmax, computed ``--chunk`` positions at a time) forward and backward on random
hidden states, in a fresh process, and reports the process's peak resident memory
(ru_maxrss) next to what unchunked logits would need. The target: under 4 GiB.

    python benchmarks/bench_loss_memory.py                   # T=16384, V=200064, H=256, chunk 1024
    python benchmarks/bench_loss_memory.py --chunk 512 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args) -> dict:
    import torch

    from eaglecache.formats.draft import DraftArch
    from eaglecache.train.target_head import TargetHead
    from eaglecache.train.loss import LMHeadLoss
    from eaglecache.train.ttt import step_weights

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    h, v, t, k = args.hidden, args.vocab, args.tokens, args.ttt
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    lm_head = torch.randn(v, h, dtype=dtype) * 0.02
    target = TargetHead(torch.empty(0, h, dtype=dtype), torch.ones(h), lm_head, 1e-5, dtype)
    arch = DraftArch(hidden_size=h, intermediate_size=4 * h, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=h // 8, rms_norm_eps=1e-5, vocab_size=v, draft_vocab_size=v, target_hidden_size=h,
                     target_num_hidden_layers=8, aux_layer_ids=[2, 4, 5], max_position_embeddings=t)
    loss_head = LMHeadLoss(arch, target, None)
    hidden = torch.randn(k, 1, t, h, dtype=dtype, requires_grad=True)
    teacher = torch.randn(1, t, h, dtype=dtype)
    loss_mask = torch.ones(1, t, dtype=torch.uint8)
    loss_mask[:, -1] = 0
    masks, weights = step_weights(loss_mask, k, 0.8)
    inputs_gib = (hidden.numel() * 2 + teacher.numel() + lm_head.numel()) * hidden.element_size() / 2 ** 30
    start = time.perf_counter()
    loss, stats = loss_head(hidden, teacher, masks, weights, args.chunk)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss) and hidden.grad is not None and torch.isfinite(hidden.grad).all()
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "rss_at_start_gib": rss_start, "inputs_and_grads_gib": inputs_gib, "seconds": elapsed,
            "loss": float(loss), "positions": int(stats[:, 2].sum()),
            "unchunked_logits_gib_per_step": t * v * 4 / 2 ** 30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=200064)
    parser.add_argument("--hidden", type=int, default=256, help="draft = target hidden size (compute grows with it)")
    parser.add_argument("--ttt", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    cmd = [sys.executable, __file__, "--child"] + sys.argv[1:]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(out.stderr[-4000:])
    r = json.loads(line[len("RESULT "):])
    verdict = "within" if r["peak_rss_gib"] < 4.0 else "OVER"
    print(f"loss of one sequence, T={args.tokens}, V={args.vocab}, H={args.hidden}, TTT {args.ttt}, {args.dtype}, "
          f"chunk {args.chunk}: peak RSS {r['peak_rss_gib']:.2f} GiB ({verdict} the 4 GiB target; inputs and their "
          f"gradients {r['inputs_and_grads_gib']:.2f} GiB, process at start {r['rss_at_start_gib']:.2f} GiB), "
          f"forward+backward {r['seconds']:.0f} s over {r['positions']} scored positions; unchunked fp32 logits "
          f"would need {r['unchunked_logits_gib_per_step']:.1f} GiB per TTT step")


if __name__ == "__main__":
    main()
