"""Decode speed with and without an EAGLE3 draft in vLLM, single stream and batched, in one run.

Speculative decoding pays off per stream: the figure that matters is output tokens/s at one
request in flight, next to the same target without a draft measured in the same run (and the
batched figure, where a draft helps less). On the CPU tiny target the draft is as wide as the
target, so do not expect a speed-up there; the script is for GPU targets too.

    python benchmarks/bench_serve.py --draft runs/demo/draft [--prompts humaneval] [--num-prompts 16] \
        [--config FILE] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from eaglecache.config import load_config
    from eaglecache.serve import prompts, vllm_engine
    from eaglecache.serve.bench import run_engine
    from eaglecache.serve.export import resolve_target_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", default="humaneval")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    config = load_config(args.config, args.overrides)
    target_dir = resolve_target_dir(config)
    prompt_set = prompts.load_prompt_set(args.prompts, target_dir, args.num_prompts)
    max_len = vllm_engine.serving_max_model_len(config, target_dir)
    prompts.render_prompt_sets([prompt_set], target_dir, max_len - config.serve.max_new_tokens)
    sampling = {"temperature": 0.0, "max_tokens": config.serve.max_new_tokens, "ignore_eos": True}
    rows = []
    for concurrency in args.concurrency:
        speeds = {}
        for label, draft in (("no draft", None), ("draft", args.draft)):
            settings = {**vllm_engine.engine_settings(config, target_dir, draft), "max_num_seqs": concurrency}
            [run] = run_engine(settings, [prompt_set], sampling, f"{label}, {concurrency} in flight")
            speeds[label] = run.num_output_tokens / run.seconds
            if draft:
                speeds["mean accept length"] = run.counters.acceptance()["mean_accept_length"]
        rows.append({"concurrency": concurrency, **speeds, "speedup": speeds["draft"] / speeds["no draft"]})
    print(f"\n{args.prompts}, {len(prompt_set.token_ids)} prompts, {config.serve.max_new_tokens} new tokens each, "
          f"{config.serve.num_speculative_tokens} speculative tokens")
    print("| in flight | tok/s no draft (baseline) | tok/s with draft | speedup | mean accept length |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['no draft']:.1f} | {r['draft']:.1f} | {r['speedup']:.2f} "
              f"| {r['mean accept length']:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
