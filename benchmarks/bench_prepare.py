"""Benchmark: ``data prepare`` throughput on the shipped ShareGPT data next to the tokenizer alone.

Prepare is timed end to end (read JSON, dedup, chat template, tokenize, mask, write Parquet). The
baseline is the target's fast tokenizer alone, batch API, on exactly the texts prepare tokenized
(the rendered conversations), timed before and after prepare in the same run, since this machine
is shared and noisy, in the batches prepare uses (one call on all texts at once was slower here).
Target: prepare takes at most 2x the tokenizer alone. The bare Rust backend
(``encode_batch_fast``: ids only, which is what prepare itself calls) is printed as the floor.

    python benchmarks/bench_prepare.py [--limit N] [--target DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from eaglecache.config import load_config
from eaglecache.data import sources
from eaglecache.data.prepare import BATCH_CONVERSATIONS, prepare_dataset
from eaglecache.data.sharegpt import sharegpt_path
from eaglecache.data.template import ChatTemplate
from eaglecache.target import resolve_target


def _sharegpt_subset(limit: int | None, root: Path) -> Path:
    if limit is None:
        return sharegpt_path()
    from eaglecache.data.sharegpt import iter_sharegpt

    records = []
    for _, record in iter_sharegpt(sharegpt_path()):
        records.append(record)
        if len(records) == limit:
            break
    path = root / "sharegpt.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def _rendered_texts(path: Path, template: ChatTemplate) -> list[str]:
    """The texts prepare tokenizes: every unique usable conversation, rendered (not timed)."""
    texts, seen = [], set()
    for item in sources.iter_file(path):
        if isinstance(item, sources.Conversation):
            digest = sources.content_hash(item.messages)
            if digest not in seen:
                seen.add(digest)
                texts.append(template.render(template.with_system_prompt(item.messages)).text)
    return texts


def _time_tokenizer(template: ChatTemplate, texts: list[str]) -> tuple[float, int]:
    """The tokenizer alone as a user calls it: the transformers fast tokenizer's batch call."""
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), BATCH_CONVERSATIONS):
        tokens += sum(map(len, template.tokenizer(texts[i:i + BATCH_CONVERSATIONS],
                                                  add_special_tokens=False)["input_ids"]))
    return time.perf_counter() - start, tokens


def _time_backend(template: ChatTemplate, texts: list[str]) -> float:
    """The Rust tokenizer with nothing around it (ids only, no offsets): the floor."""
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH_CONVERSATIONS):
        template.backend.encode_batch_fast(texts[i:i + BATCH_CONVERSATIONS], add_special_tokens=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="First N ShareGPT records (default: all).")
    parser.add_argument("--target", default=None, help="Target directory (default: the tiny target).")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    config = load_config(None)
    target = Path(args.target) if args.target else resolve_target(config)
    template = ChatTemplate(target, config.data.system_prompt)
    with tempfile.TemporaryDirectory() as tmp:
        source = _sharegpt_subset(args.limit, Path(tmp))
        texts = _rendered_texts(source, template)
        chars = sum(map(len, texts))
        tok_before, tokens = _time_tokenizer(template, texts)
        rust_before = _time_backend(template, texts)
        start = time.perf_counter()
        meta = prepare_dataset([source], Path(tmp) / "ds", config.data, target, show_progress=False)
        prepare_s = time.perf_counter() - start
        rust_after = _time_backend(template, texts)
        tok_after, _ = _time_tokenizer(template, texts)
    report = meta["report"]
    tokenizer_s = (tok_before + tok_after) / 2
    rust_s = (rust_before + rust_after) / 2
    figures = {
        "records_in": report["records_in"], "records_out": report["records_out"], "texts": len(texts),
        "chars": chars, "tokens_full": tokens, "tokens_stored": meta["num_tokens"],
        "prepare_s": round(prepare_s, 2), "tokenizer_alone_s": [round(tok_before, 2), round(tok_after, 2)],
        "prepare_records_per_s": round(report["records_in"] / prepare_s, 1),
        "prepare_tokens_per_s": round(tokens / prepare_s), "tokenizer_tokens_per_s": round(tokens / tokenizer_s),
        "ratio_prepare_over_tokenizer": round(prepare_s / tokenizer_s, 3),
        "rust_backend_alone_s": [round(rust_before, 2), round(rust_after, 2)],
        "ratio_prepare_over_rust_backend": round(prepare_s / rust_s, 3),
        "max_seq_length": config.data.max_seq_length, "loss_mask_method": meta["loss_mask_method"],
    }
    print(f"ShareGPT: {report['records_in']:,} records in, {report['records_out']:,} out, {len(texts):,} texts, "
          f"{chars / 1e6:.1f} M chars, {tokens / 1e6:.2f} M tokens before truncation to {config.data.max_seq_length}")
    print(f"prepare          {prepare_s:7.2f} s  {figures['prepare_records_per_s']:>9,.1f} records/s  "
          f"{figures['prepare_tokens_per_s']:>11,} tokens/s")
    print(f"tokenizer alone  {tokenizer_s:7.2f} s  (runs {tok_before:.2f} s before, {tok_after:.2f} s after)  "
          f"{figures['tokenizer_tokens_per_s']:>11,} tokens/s")
    print(f"Rust backend     {rust_s:7.2f} s  (runs {rust_before:.2f} s before, {rust_after:.2f} s after)  "
          f"{round(tokens / rust_s):>11,} tokens/s")
    print(f"prepare / tokenizer alone = {figures['ratio_prepare_over_tokenizer']:.2f}x (target <= 2x); "
          f"prepare / Rust backend alone = {figures['ratio_prepare_over_rust_backend']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
