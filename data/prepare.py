"""``eaglecache data prepare``: conversation files -> the tokenized, loss-masked Parquet data set.

One pass, streaming: read records (data/sources.py), drop duplicates by content hash, render with
the target's chat template and tokenize a batch at a time (data/template.py), apply the long
conversation policy, and stream rows into ``write_dataset`` (atomic). Every record that is not
used is counted under a reason; the report goes to the terminal and into dataset.json.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from eaglecache.data import sources
from eaglecache.data.config import DataConfig
from eaglecache.data.writer import write_dataset
from eaglecache.data.template import ChatTemplate, RenderError
from eaglecache.errors import UserError

BATCH_CONVERSATIONS = 256  # one tokenizer batch; large enough to keep the Rust threads busy
DUPLICATE = "duplicate"
TOO_LONG = "too_long"
TOO_FEW_LOSS_TOKENS = "too_few_loss_tokens"


class Report:
    """Counts for the summary: records in and out, tokens, and every dropped record by reason."""

    def __init__(self):
        self.records_in = 0
        self.records_out = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.truncated = 0
        self.exact_answers = self.retokenized_answers = 0
        self.dropped: Counter[str] = Counter()
        self.file_problems: list[str] = []
        self.first_problem: dict[str, str] = {}

    def drop(self, source: str, record_index: int | None, reason: str, detail: str) -> None:
        where = f"{source}" if record_index is None else f"{source} record {record_index}"
        self.first_problem.setdefault(reason, f"{where}: {detail}")
        if record_index is None:
            self.file_problems.append(f"{where}: {detail}")
        else:
            self.records_in += 1
            self.dropped[reason] += 1

    def to_dict(self) -> dict:
        return {"records_in": self.records_in, "records_out": self.records_out, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "truncated": self.truncated,
                "answers_with_generated_ids": self.exact_answers, "answers_retokenized": self.retokenized_answers,
                "dropped": dict(sorted(self.dropped.items())), "file_problems": self.file_problems,
                "first_problem": self.first_problem}


def _batches(inputs: Iterable[str | Path], report: Report) -> Iterator[list[sources.Conversation]]:
    """Unique usable conversations of all inputs, in input order, a batch at a time."""
    seen: set[bytes] = set()
    batch = []
    for path in inputs:
        for item in sources.iter_file(path):
            if isinstance(item, sources.Problem):
                report.drop(item.source, item.record_index, item.reason, item.detail)
                continue
            digest = sources.content_hash(item.messages)
            key = bytes.fromhex(digest)
            if key in seen:
                report.drop(item.source, item.record_index, DUPLICATE, "same messages as an earlier record")
                continue
            seen.add(key)
            item.content_hash = digest
            batch.append(item)
            if len(batch) == BATCH_CONVERSATIONS:
                yield batch
                batch = []
    if batch:
        yield batch


def _rows(inputs, template: ChatTemplate, config: DataConfig, report: Report, progress) -> Iterator[dict]:
    for batch in _batches(inputs, report):
        rendered, kept = [], []
        for conv in batch:
            try:
                rendered.append(template.render(template.with_system_prompt(conv.messages)))
                kept.append(conv)
            except RenderError as exc:
                report.drop(conv.source, conv.record_index, exc.reason, str(exc))
        for conv, (ids, mask) in zip(kept, template.encode(rendered)):
            if len(ids) > config.max_seq_length:
                if config.long_policy == "drop":
                    report.drop(conv.source, conv.record_index, TOO_LONG,
                                f"{len(ids)} tokens > max_seq_length {config.max_seq_length}")
                    continue
                ids, mask = ids[:config.max_seq_length], mask[:config.max_seq_length]
                report.truncated += 1
            num_loss = int(mask.sum())
            if num_loss < config.min_loss_tokens:
                report.drop(conv.source, conv.record_index, TOO_FEW_LOSS_TOKENS,
                            f"{num_loss} loss-masked tokens < min_loss_tokens {config.min_loss_tokens}")
                continue
            report.records_in += 1
            report.records_out += 1
            report.tokens += len(ids)
            report.loss_tokens += num_loss
            yield {"input_ids": ids, "loss_mask": mask, "source": conv.source,
                   "record_index": conv.record_index, "content_hash": conv.content_hash}
        report.exact_answers, report.retokenized_answers = template.exact_answers, template.retokenized_answers
        progress.update(len(batch))
        progress.set_postfix(out=report.records_out, dropped=sum(report.dropped.values()), refresh=False)
    if report.records_out == 0:
        first = next(iter(report.first_problem.values()), "no records")
        raise UserError(f"no usable conversations in {', '.join(map(str, inputs))} (first problem: {first})")


def prepare_dataset(inputs: list[str | Path], output: str | Path, config: DataConfig,
                    target_path: str | Path, show_progress: bool = True) -> dict:
    """Prepare ``inputs`` into a data set at ``output`` for the target at ``target_path``; returns dataset.json."""
    inputs = [str(p) for p in inputs]
    for path in inputs:
        if not Path(path).is_file():
            raise UserError(f"input file not found: {path}")
    template = ChatTemplate(target_path, config.system_prompt)
    report = Report()
    metadata = {
        "tokenizer_hash": template.tokenizer_hash, "chat_template_hash": template.chat_template_hash,
        "target_path": str(target_path), "config": config.model_dump(mode="json"),
        "inputs": [{"path": p, "sha256": sources.file_sha256(p)} for p in inputs],
        "loss_mask_method": template.method, "end_of_turn_tokens": template.end_of_turn_tokens,
    }
    with tqdm(desc="prepare", unit="conv", disable=not show_progress, mininterval=1.0) as progress:
        rows = _rows(inputs, template, config, report, progress)
        return write_dataset(output, rows, lambda: {**metadata, "report": report.to_dict()})


def format_report(report: dict) -> str:
    """The end-of-run summary of a report dict (as stored in dataset.json)."""
    lines = [f"records in {report['records_in']:,}, out {report['records_out']:,}; tokens {report['tokens']:,}, "
             f"loss-masked {report['loss_tokens']:,}; truncated {report['truncated']:,}"]
    if report.get("answers_with_generated_ids") or report.get("answers_retokenized"):
        lines.append(f"  answers in the target's generated tokens: {report['answers_with_generated_ids']:,}; "
                     f"re-tokenized (text no longer matches its ids): {report['answers_retokenized']:,}")
    for reason, count in report["dropped"].items():
        lines.append(f"  dropped {reason}: {count:,} (first: {report['first_problem'][reason]})")
    lines += [f"  file problem: {p}" for p in report["file_problems"]]
    return "\n".join(lines)


def run_prepare(config, *, inputs: list[str | Path], output: str | Path) -> int:
    """Prepare the conversation files ``inputs`` into a data set at ``output`` for the configured target."""
    from eaglecache.target import resolve_target

    target_path = resolve_target(config)
    meta = prepare_dataset(inputs, output, config.data, target_path)
    print(f"prepared {output}: {meta['num_samples']:,} samples, {meta['num_tokens']:,} tokens, "
          f"{meta['num_loss_tokens']:,} loss-masked (mask: {meta['loss_mask_method']})")
    print(format_report(meta["report"]))
    return 0
