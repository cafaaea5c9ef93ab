"""`eaglecache bench`: acceptance and speed of exported drafts in vLLM, per prompt set, like the model card.

One offline vLLM engine per configuration, each started once for all prompt sets: the target
alone (the speed baseline and the reference outputs), then the target with each draft (several
drafts, e.g. an ablation's, share that baseline and the prompt sets). For each set the spec-decode
counters are read before and after the full-batch `generate`, so every row is that set's own delta;
then the first `serve.single_stream_prompts` prompts are generated one request at a time, for
tokens/s at one stream beside tokens/s at the full batch. Greedy decoding is lossless, so with
temperature 0 every draft's outputs are compared token for token with the target's and the count
of identical ones is reported.

Writes OUTPUT/results.json (everything, with provenance), results.md (the table),
acceptance.png (per-position acceptance) and re-renders each draft's README.md with its rows.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eaglecache.errors import UserError
from eaglecache.serve import prompts, vllm_engine
from eaglecache.serve.card import render_model_card, results_table
from eaglecache.formats.draft import MODEL_CARD, read_draft_dir, served_aux_layer_ids
from eaglecache.serve.export import build_untrained_draft, resolve_target_dir
from eaglecache.serve.metrics import SpecCounters, counters_from_metrics

log = logging.getLogger(__name__)

RESULTS_FORMAT, RESULTS_VERSION = "eaglecache.bench", 1
UNTRAINED = "untrained"


# Two greedy tokens whose target log-probs are this close are a tie at bf16 precision: kernels that
# batch the positions differently (verifying k+1 tokens at once vs decoding one) may break the tie
# either way, so a greedy output that departs at such a tie is not a lossiness of the draft.
TIE_NATS = 0.05
REFERENCE_LOGPROBS = 5  # top log-probs kept from the target-alone run, to classify departures


@dataclass
class SetRun:
    """What one engine did on one prompt set."""
    outputs: list[list[int]]
    seconds: float
    counters: SpecCounters
    logprobs: list[list[dict[int, float]]] | None = None  # per prompt, per output token: top token -> log-prob
    one_stream_tokens: int = 0  # the single-stream pass: output tokens and seconds, requests one at a time
    one_stream_seconds: float = 0.0

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


def run_engine(settings: dict[str, Any], prompt_sets: list[prompts.PromptSet], sampling: dict[str, Any],
               title: str, single_stream_prompts: int = 0) -> list[SetRun]:
    """Start one vLLM engine, generate every prompt set (all at once, then the first ``single_stream_prompts``
    one request at a time), shut the engine down."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    log.info("starting vLLM: %s", title)
    llm = LLM(**settings)
    try:
        # one short request first: the engine's first steps pay for lazy initialisation, which would
        # otherwise be charged to the first set's tokens/s (counters are deltas, so it counts nowhere)
        first = next((s.token_ids[0] for s in prompt_sets if s.token_ids), None)
        if first is not None:
            llm.generate([TokensPrompt(prompt_token_ids=first)], SamplingParams(**{**sampling, "max_tokens": 8}),
                         use_tqdm=False)
        runs = []
        for prompt_set in prompt_sets:
            requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_set.token_ids]
            before = counters_from_metrics(llm.get_metrics())
            start = time.perf_counter()
            results = llm.generate(requests, SamplingParams(**sampling), use_tqdm=True)
            seconds = time.perf_counter() - start
            counters = counters_from_metrics(llm.get_metrics()) - before
            logprobs = None
            if sampling.get("logprobs"):
                logprobs = [[{t: lp.logprob for t, lp in step.items()} for step in r.outputs[0].logprobs]
                            for r in results]
            run = SetRun([list(r.outputs[0].token_ids) for r in results], seconds, counters, logprobs)
            for request in requests[:single_stream_prompts]:
                start = time.perf_counter()
                result = llm.generate([request], SamplingParams(**sampling), use_tqdm=False)
                run.one_stream_seconds += time.perf_counter() - start
                run.one_stream_tokens += len(result[0].outputs[0].token_ids)
            runs.append(run)
        return runs
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _speed(tokens: int, seconds: float, baseline_tokens: int, baseline_seconds: float) -> tuple:
    """tokens/s with the draft, without it, and their ratio (None where nothing was timed)."""
    with_draft = tokens / seconds if seconds else None
    alone = baseline_tokens / baseline_seconds if baseline_seconds else None
    return with_draft, alone, with_draft / alone if with_draft and alone else None


def _row(label: str, prompt_set: prompts.PromptSet, run: SetRun, baseline: SetRun, greedy: bool) -> dict[str, Any]:
    speed = _speed(run.num_output_tokens, run.seconds, baseline.num_output_tokens, baseline.seconds)
    one_stream = _speed(run.one_stream_tokens, run.one_stream_seconds,
                        baseline.one_stream_tokens, baseline.one_stream_seconds)
    row = {"draft": label, "prompt_set": prompt_set.name, "n": len(prompt_set.token_ids),
           "skipped_too_long": prompt_set.skipped_too_long, **run.counters.acceptance(),
           "num_output_tokens": run.num_output_tokens, "seconds": run.seconds,
           **dict(zip(("tokens_per_s", "baseline_tokens_per_s", "speedup"), speed)),
           "one_stream_output_tokens": run.one_stream_tokens, "one_stream_seconds": run.one_stream_seconds,
           **dict(zip(("one_stream_tokens_per_s", "one_stream_baseline_tokens_per_s", "one_stream_speedup"),
                      one_stream))}
    if greedy:
        pairs = list(zip(run.outputs, baseline.outputs))
        row["identical_to_target"] = sum(a == b for a, b in pairs)
        row["differences"] = [first_difference(i, a, b, baseline.logprobs[i] if baseline.logprobs else None)
                              for i, (a, b) in enumerate(pairs) if a != b]
        row["departures_at_ties"] = sum(d["tie"] for d in row["differences"])
    return row


def first_difference(index: int, with_draft: list[int], alone: list[int],
                     alone_logprobs: list[dict[int, float]] | None) -> dict[str, Any]:
    """Where a greedy output with the draft first departs from the target's own, and whether the
    target itself was tied there (both tokens within TIE_NATS of log-prob in its own run)."""
    position = next((i for i, (a, b) in enumerate(zip(with_draft, alone)) if a != b), min(len(with_draft), len(alone)))
    tie, top = False, None
    if alone_logprobs is not None and position < min(len(with_draft), len(alone)):
        top = alone_logprobs[position]
        ours, theirs = top.get(with_draft[position]), top.get(alone[position])
        tie = ours is not None and theirs is not None and abs(ours - theirs) <= TIE_NATS
    return {"prompt_index": index, "position": position, "tie": tie,
            "target_top_logprobs": {str(t): round(v, 4) for t, v in (top or {}).items()},
            "with_draft": with_draft[position:position + 8], "target_alone": alone[position:position + 8]}


def benchmark(config, target_dir: Path, drafts: dict[str, Path], prompt_sets: list[prompts.PromptSet]) -> dict[str, Any]:
    """Run the target alone and with each draft over the prompt sets; the results document."""
    serve = config.serve
    max_len = vllm_engine.serving_max_model_len(config, target_dir)
    prompts.render_prompt_sets(prompt_sets, target_dir, max_len - serve.max_new_tokens)
    sampling = {"temperature": serve.temperature, "max_tokens": serve.max_new_tokens, "seed": serve.seed}
    greedy = serve.temperature == 0.0
    if greedy:  # every run computes them, so the speeds compare like with like
        sampling["logprobs"] = REFERENCE_LOGPROBS
    one_stream = serve.single_stream_prompts
    baseline = run_engine(vllm_engine.engine_settings(config, target_dir, None), prompt_sets, sampling,
                          "target alone (speed baseline, reference outputs)", one_stream)
    rows = []
    for label, draft_dir in drafts.items():
        runs = run_engine(vllm_engine.engine_settings(config, target_dir, draft_dir), prompt_sets, sampling,
                          f"target + draft {label!r}", one_stream)
        rows += [_row(label, s, r, b, greedy) for s, r, b in zip(prompt_sets, runs, baseline)]
    import vllm

    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "target_path": str(target_dir), "vllm_version": vllm.__version__,
        "num_speculative_tokens": serve.num_speculative_tokens, "temperature": serve.temperature,
        "max_new_tokens": serve.max_new_tokens, "max_model_len": max_len, "single_stream_prompts": one_stream,
        "drafts": {label: {"path": str(path), **_draft_identity(path)} for label, path in drafts.items()},
        "prompt_sets": [{"name": s.name, "source": s.source, "n": len(s.token_ids),
                         "skipped_too_long": s.skipped_too_long, "sha256": s.sha256()} for s in prompt_sets],
        # the one identity rule (eaglecache/section.py): settings that never change a result are left out
        "config": config.to_dict(), "config_fingerprint": config.fingerprint("target", "serve"),
        "rows": rows,
    }


def _draft_identity(path: Path) -> dict[str, Any]:
    _, meta = read_draft_dir(path)
    return {"source": meta.get("source"), "weights_sha256": meta.get("weights_sha256")}


def plot_acceptance(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["num_speculative_tokens"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in results["rows"]:
        if row["per_position_accept_rate"]:
            ax.plot(range(1, k + 1), row["per_position_accept_rate"], marker="o",
                    label=f"{row['draft']} / {row['prompt_set']} (len {row['mean_accept_length']:.2f})")
    ax.set(xlabel="draft position", ylabel="accepted share of drafts", ylim=(0, 1.02), xticks=range(1, k + 1),
           title=f"Per-position acceptance in vLLM, {k} speculative tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def results_markdown(results: dict[str, Any]) -> str:
    mode = "greedy" if not results["temperature"] else f"temperature {results['temperature']}"
    lines = [f"# Acceptance of speculative drafts on `{results['target_path']}`\n",
             f"vLLM {results['vllm_version']}, {results['num_speculative_tokens']} speculative tokens, {mode}, "
             f"up to {results['max_new_tokens']} new tokens per prompt.\n",
             results_table(results["rows"], results["num_speculative_tokens"])]
    checked = [r for r in results["rows"] if "identical_to_target" in r]
    if checked:
        lines.append("Greedy outputs identical to the target alone: " + ", ".join(
            f"{r['draft']}/{r['prompt_set']} {r['identical_to_target']}/{r['n']}" for r in checked)
            + f"; the others depart where the target's own top two tokens tie at bf16 precision (within "
              f"{TIE_NATS} nats): " + ", ".join(
            f"{r['draft']}/{r['prompt_set']} {r['departures_at_ties']}" for r in checked) + ".\n")
    skipped = [s for s in results["prompt_sets"] if s["skipped_too_long"]]
    if skipped:
        lines.append("Prompts skipped as longer than the context allows: " + ", ".join(
            f"{s['name']} {s['skipped_too_long']}" for s in skipped) + ".\n")
    return "\n".join(lines)


def write_results(results: dict[str, Any], output: Path) -> None:
    """results.json, results.md and acceptance.png, each written whole then renamed into place."""
    output.mkdir(parents=True, exist_ok=True)
    _write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
    _write_text(output / "results.md", results_markdown(results))
    tmp_png = output / f".acceptance.tmp-{os.getpid()}.png"
    plot_acceptance(results, tmp_png)
    tmp_png.replace(output / "acceptance.png")


def update_model_card(draft_dir: Path, label: str, results: dict[str, Any]) -> None:
    """Re-render the draft's README.md with its own rows of the results."""
    config, meta = read_draft_dir(draft_dir)
    if not meta:
        return
    own = {**results, "rows": [r for r in results["rows"] if r["draft"] == label]}
    _write_text(draft_dir / MODEL_CARD, render_model_card(config, meta, meta.get("training"), own))


def draft_labels(draft_dirs: list[Path]) -> dict[str, Path]:
    """Each draft's row label: "trained" for a lone exported training run (the demo's reading), else the
    directory's name, which must then tell the drafts apart."""
    if len(draft_dirs) == 1:
        _, meta = read_draft_dir(draft_dirs[0])
        return {"trained" if meta.get("source") == "training run" else draft_dirs[0].name: draft_dirs[0]}
    labels = [d.name for d in draft_dirs]
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise UserError(f"--draft: several drafts named {', '.join(repeated)}; rows are labelled by directory "
                        "name, so give each draft its own")
    if UNTRAINED in labels:
        raise UserError(f"--draft: a draft directory named {UNTRAINED!r} would share its label with the "
                        "--untrained-baseline rows; rename it")
    return dict(zip(labels, draft_dirs))


def bench(config, *, drafts: list[str | Path], prompt_sets: list[str], output: str | Path,
          untrained_baseline: bool = False, overwrite: bool = False) -> int:
    """Benchmark the exported ``drafts`` (and, with ``untrained_baseline``, a random draft of the first one's
    shape and family) against the target alone on ``prompt_sets`` (names or JSONL files); results into
    ``output``, each draft's rows into its model card. ``overwrite`` as `--overwrite`."""
    from eaglecache import outputs

    outputs.claim_output(output, overwrite, "bench", outputs.bench_results)
    target_dir = resolve_target_dir(config)
    labelled = draft_labels([Path(d).resolve() for d in drafts])
    for draft_dir in labelled.values():
        draft_config, _ = read_draft_dir(draft_dir)
        vllm_engine.check_draft_fits_target(draft_config, target_dir)
    output = Path(output)
    sets = [prompts.load_prompt_set(name, target_dir, config.serve.max_prompts) for name in prompt_sets]
    benched = dict(labelled)
    if untrained_baseline:
        first_config, first_meta = read_draft_dir(next(iter(labelled.values())))
        family = (first_meta.get("draft_json") or {}).get("family", "eagle3")  # the baseline is of its family
        benched[UNTRAINED] = build_untrained_draft(target_dir, output / "untrained-draft", config.serve.seed,
                                                   served_aux_layer_ids(first_config),
                                                   vllm_engine.serving_max_model_len(config, target_dir),
                                                   family=family)
    results = benchmark(config, target_dir, benched, sets)
    write_results(results, output)
    for label, draft_dir in labelled.items():
        update_model_card(draft_dir, label, results)
    print(results_table(results["rows"], results["num_speculative_tokens"]))
    print(f"results: {output / 'results.md'}, {output / 'results.json'}, {output / 'acceptance.png'}; "
          f"model cards updated: {', '.join(str(d / MODEL_CARD) for d in labelled.values())}")
    return 0
