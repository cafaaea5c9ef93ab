"""``eaglecache data regenerate``: every assistant turn replaced by the target's own answer (vLLM).

Turn by turn: the prompt of assistant turn k is the original user/system turns with the target's
own answers to turns 0..k-1, rendered by the target's chat template with its generation prompt
(so thinking blocks and tool-call syntax come out in the model's own format), and turn k of every
conversation in a chunk goes to vLLM in one ``generate`` call. The answer text is kept verbatim,
special tokens included (reasoning markers survive); the stop token itself is not part of it, the
template adds it back when prepare renders the conversation. Each answer also keeps the exact
token ids the target generated (``token_ids``, stop token left out): a model often emits a text in
other tokens than the tokenizer would split it into, and the draft must learn the target's own
tokens, so prepare uses these ids instead of re-tokenizing the text. Output is messages JSONL that
prepare reads, written to a temp file and renamed into place, with ``<output>.json`` beside it
recording the config, input and target hashes and the report.

``data.system_prompt``, when set, is part of every prompt (prepare adds it the same way when it
renders the conversation) but is not written to the output.

A conversation whose next prompt no longer fits ``max_model_len`` keeps the turns regenerated so
far (counted as cut short); one with no turn regenerated is dropped and counted.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from eaglecache.data import sources
from eaglecache.data.template import ChatTemplate, RenderError
from eaglecache.errors import UserError

PROMPT_TOO_LONG = "prompt_too_long"
DUPLICATE = "duplicate"


def max_model_len(config) -> int:
    return int(config.target.max_model_len or config.data.max_seq_length)


def make_engine(config, target_path: str | Path):
    """The vLLM engine regeneration runs the target in (config.target's vLLM settings)."""
    from vllm import LLM

    rc = config.data.regenerate
    return LLM(model=str(target_path), max_model_len=max_model_len(config), seed=rc.seed,
               **config.target.vllm_engine_args(rc.tensor_parallel_size))


def sampling_params(config, seed_offset: int, max_tokens: int):
    from vllm import SamplingParams

    rc = config.data.regenerate
    greedy = rc.temperature == 0.0
    return SamplingParams(
        temperature=rc.temperature, top_p=1.0 if greedy else rc.top_p, max_tokens=max_tokens,
        seed=None if greedy else rc.seed + seed_offset,  # per request: independent of batching
        skip_special_tokens=False, spaces_between_special_tokens=False,
    )


class _Job:
    """One conversation being regenerated: messages done so far and original messages still to go."""

    def __init__(self, ordinal: int, conv: sources.Conversation):
        self.ordinal, self.conv = ordinal, conv
        self.done: list[dict] = []
        self.rest = [{"role": m["role"], "content": m["content"]} for m in conv.messages]
        self.turns = 0
        self.cut_short = False

    def next_prompt(self) -> list[dict] | None:
        """Move the turns before the next assistant turn into ``done``; None when no assistant turn is left."""
        while self.rest and self.rest[0]["role"] != "assistant":
            self.done.append(self.rest.pop(0))
        return list(self.done) if self.rest else None

    def finish(self) -> list[dict]:
        """The regenerated conversation, ending with the target's last answer."""
        while self.done and self.done[-1]["role"] != "assistant":
            self.done.pop()
        return self.done


class Stats:
    def __init__(self):
        self.records_in = self.records_out = self.turns = self.new_tokens = 0
        self.hit_max_new_tokens = self.cut_short = 0
        self.dropped: Counter[str] = Counter()
        self.file_problems: list[str] = []

    def to_dict(self) -> dict:
        return {"records_in": self.records_in, "records_out": self.records_out, "turns_regenerated": self.turns,
                "new_tokens": self.new_tokens, "hit_max_new_tokens": self.hit_max_new_tokens,
                "cut_short": self.cut_short, "dropped": dict(sorted(self.dropped.items())),
                "file_problems": self.file_problems}


def regenerate_chunk(llm, template: ChatTemplate, config, jobs: list[_Job], stats: Stats, progress) -> None:
    """Regenerate every assistant turn of ``jobs``, one vLLM call per turn index."""
    limit = max_model_len(config)
    active = list(jobs)
    while active:
        waiting = []
        for job in active:
            messages = job.next_prompt()
            if messages is None:
                continue
            try:
                waiting.append((job, template.render_prompt(messages)))
            except RenderError as exc:
                stats.dropped[exc.reason] += 1
                progress.update(sum(m["role"] == "assistant" for m in job.rest))
                job.done = []
        prompt_ids = template.tokenize([text for _, text in waiting])
        active, requests, params = [], [], []
        for (job, _), ids in zip(waiting, prompt_ids):
            room = min(config.data.regenerate.max_new_tokens, limit - len(ids))
            if room < 1:  # context is full: stop this conversation here
                job.cut_short = True
                progress.update(sum(m["role"] == "assistant" for m in job.rest))
                continue
            active.append(job)
            requests.append({"prompt_token_ids": ids})
            params.append(sampling_params(config, 1000 * job.ordinal + job.turns, room))
        if not active:
            break
        outputs = llm.generate(requests, params, use_tqdm=False)
        for job, out in zip(active, outputs):
            completion = out.outputs[0]
            job.rest.pop(0)
            ids = list(completion.token_ids)
            while ids and ids[-1] in template.end_of_turn_ids:
                ids.pop()
            job.done.append({"role": "assistant", "content": completion.text, "token_ids": ids})
            job.turns += 1
            stats.turns += 1
            stats.new_tokens += len(completion.token_ids)
            stats.hit_max_new_tokens += completion.finish_reason == "length"
        progress.update(len(active))


def _conversations(path: str | Path, limit: int | None, stats: Stats) -> Iterator[sources.Conversation]:
    """Usable, first-seen conversations of the input (the first ``limit`` of them); the rest counted."""
    taken, seen = 0, set()
    for item in sources.iter_file(path):
        if limit is not None and taken >= limit:
            return
        if isinstance(item, sources.Problem):
            if item.record_index is None:
                stats.file_problems.append(f"{item.source}: {item.detail}")
            else:
                stats.records_in += 1
                stats.dropped[item.reason] += 1
            continue
        stats.records_in += 1
        key = sources.content_hash(item.messages)
        if key in seen:  # prepare would drop it anyway: do not pay for generating it
            stats.dropped[DUPLICATE] += 1
            continue
        seen.add(key)
        taken += 1
        yield item


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def regenerate_file(input_path: str | Path, output: str | Path, config, target_path: str | Path,
                    llm=None, limit: int | None = None, show_progress: bool = True) -> dict:
    """Regenerate ``input_path`` into messages JSONL at ``output``; starts an engine unless ``llm`` is given."""
    input_path, output = Path(input_path), Path(output)
    if not input_path.is_file():
        raise UserError(f"input file not found: {input_path}")
    template = ChatTemplate(target_path, config.data.system_prompt)
    if llm is None:
        llm = make_engine(config, target_path)
    stats = Stats()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    ordinal = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f, \
                tqdm(desc="regenerate", unit="turn", disable=not show_progress, mininterval=1.0) as progress:
            for chunk in _chunks(_conversations(input_path, limit, stats), config.data.regenerate.batch_size):
                jobs = [_Job(ordinal + i, conv) for i, conv in enumerate(chunk)]
                ordinal += len(jobs)
                progress.total = (progress.total or 0) + sum(
                    m["role"] == "assistant" for c in chunk for m in c.messages)
                regenerate_chunk(llm, template, config, jobs, stats, progress)
                for job in jobs:
                    messages = job.finish()
                    if not messages:
                        if job.cut_short:
                            stats.dropped[PROMPT_TOO_LONG] += 1
                        continue
                    stats.cut_short += job.cut_short
                    stats.records_out += 1
                    f.write(json.dumps({"messages": messages, "source": job.conv.source,
                                        "record_index": job.conv.record_index}, ensure_ascii=False) + "\n")
        if stats.records_out == 0:
            raise UserError(f"{input_path}: no conversation could be regenerated ({stats.to_dict()['dropped']})")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    report = {**stats.to_dict(), "seconds": round(time.perf_counter() - start, 3)}
    _write_sidecar(output, input_path, config, target_path, template, report)
    return report


def _write_sidecar(output: Path, input_path: Path, config, target_path, template: ChatTemplate, report) -> None:
    from eaglecache.target import weights_hash

    meta = {"format": "eaglecache.regenerated", "version": 1, "output_sha256": sources.file_sha256(output),
            "input": {"path": str(input_path), "sha256": sources.file_sha256(input_path)},
            "target_path": str(target_path), "target_weights_hash": weights_hash(target_path),
            "tokenizer_hash": template.tokenizer_hash, "chat_template_hash": template.chat_template_hash,
            "config": {"target": config.target.model_dump(mode="json"), "data": config.data.model_dump(mode="json")},
            "compute_dtype": config.target.compute_dtype(),
            "report": report}
    side = output.with_name(output.name + ".json")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, side)


def format_report(report: dict) -> str:
    rate = report["new_tokens"] / max(report["seconds"], 1e-9)
    lines = [f"conversations in {report['records_in']:,}, out {report['records_out']:,}; "
             f"{report['turns_regenerated']:,} turns, {report['new_tokens']:,} new tokens "
             f"({rate:,.0f} tokens/s, {report['seconds']:.1f} s); "
             f"{report['hit_max_new_tokens']:,} answers hit max_new_tokens; {report['cut_short']:,} cut short"]
    lines += [f"  dropped {reason}: {count:,}" for reason, count in report["dropped"].items()]
    lines += [f"  file problem: {p}" for p in report["file_problems"]]
    return "\n".join(lines)


def run_regenerate(config, *, conversations: str | Path, output: str | Path, limit: int | None = None) -> int:
    """Write ``conversations`` with every assistant turn answered by the target to ``output`` (the first
    ``limit`` conversations only when given)."""
    from eaglecache.target import resolve_target

    report = regenerate_file(conversations, output, config, resolve_target(config), limit=limit)
    print(f"wrote {output}")
    print(format_report(report))
    return 0
