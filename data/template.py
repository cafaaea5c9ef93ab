"""The target's chat template and tokenizer: messages -> (input_ids, loss_mask).

The loss mask covers exactly the tokens the target itself would generate in each assistant turn.
Which tokens those are is decided per template:

* Templates that wrap assistant output in ``{% generation %}...{% endgeneration %}`` (the embedded
  tiny target's ChatML template does, with the content and its end-of-turn ``<|im_end|>`` inside
  the tags and the newline after it outside): the mask is exactly the text the tags enclose, found
  with transformers' own generation-span tracking (the machinery of ``return_assistant_tokens_mask``).
  Whatever the template author put inside the tags (end-of-turn token, reasoning block) is masked;
  nothing outside is.
* Templates without the tags (ChatML, Llama 3, most shipped templates): the assistant span is found
  by rendering prefix by prefix: the text that ``messages[:k+1]`` adds to ``messages[:k]`` rendered
  with ``add_generation_prompt=True`` is what the model emits for turn k. Of that text the mask
  keeps everything up to and including the FIRST end-of-turn token (the tokenizer's eos token and
  the ``eos_token_id`` list of generation_config.json, e.g. ``<|im_end|>``, ``<|eot_id|>``), since
  sampling stops there; what the template appends after it (a newline before the next header) is
  formatting, not model output, and stays unmasked. Without any end-of-turn token in the span,
  trailing whitespace is left out. A template whose rendering is not prefix-stable for a
  conversation (it rewrites earlier turns) cannot be diffed: that record is counted as
  ``template_mismatch`` and skipped, never masked wrongly.

Tokens never straddle a span boundary: the text is cut at the span boundaries and the pieces are
tokenized separately (the prefix before an answer then tokenizes exactly as the prompt the target
continues at inference, and the masked tokens decode to exactly the span). Rendering is Python
(jinja); tokenization is one batched call of the fast tokenizer's Rust backend per batch of
conversations, with no per-token Python loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eaglecache.errors import UserError
from eaglecache.target import chat_template_hash, tokenizer_hash

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
TEMPLATE_ERROR = "template_error"
TEMPLATE_MISMATCH = "template_mismatch"


class RenderError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans of assistant output the target produced
    # per span: (the ids the target generated, the content they decode to), if known
    span_ids: list[tuple[list[int], str] | None] | None = None


def _eos_ids(target_path: Path, tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen_config = target_path / "generation_config.json"
    if gen_config.is_file():
        value = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if value is not None else []
    return sorted(set(ids))


class ChatTemplate:
    """A target's tokenizer and chat template, with the loss-mask method its template allows."""

    def __init__(self, target_path: str | Path, system_prompt: str | None = None):
        from transformers import AutoTokenizer
        from transformers.utils.chat_template_utils import render_jinja_template

        self.target_path = Path(target_path)
        self.exact_answers = self.retokenized_answers = 0  # answers with generated ids: kept / re-tokenized
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.target_path))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the target's tokenizer from {self.target_path}: {exc}") from None
        self.backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if self.backend is None:
            raise UserError(f"{self.target_path}: a fast tokenizer (tokenizer.json) is needed")
        try:
            self.template = self.tokenizer.get_chat_template()
        except ValueError:
            raise UserError(f"{self.target_path}: the tokenizer has no chat template") from None
        self._render_jinja = render_jinja_template
        self.system_prompt = system_prompt
        self.has_generation_tags = bool(GENERATION_TAG.search(self.template))
        self.method = "generation_tags" if self.has_generation_tags else "prefix_diff"
        self.end_of_turn_ids = _eos_ids(self.target_path, self.tokenizer)
        self.end_of_turn_tokens = [self.tokenizer.convert_ids_to_tokens(i) for i in self.end_of_turn_ids]
        self.template_kwargs = dict(self.tokenizer.special_tokens_map)
        self.chat_template_hash = chat_template_hash(self.target_path)
        self.tokenizer_hash = tokenizer_hash(self.target_path)

    def with_system_prompt(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _render(self, messages: list[dict], add_generation_prompt: bool = False, spans: bool = False):
        import jinja2

        try:
            texts, indices = self._render_jinja(
                conversations=[messages], chat_template=self.template, return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt, **self.template_kwargs,
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise RenderError(TEMPLATE_ERROR, f"chat template failed: {exc}") from None
        return (texts[0], indices[0]) if spans else texts[0]

    def _end_of_turn(self, text: str, start: int, end: int) -> int:
        """End of the produced text in text[start:end]: just after the first end-of-turn token."""
        found = [p + len(tok) for tok in self.end_of_turn_tokens if (p := text.find(tok, start, end)) >= 0]
        if found:
            return min(found)
        return start + len(text[start:end].rstrip())

    def render(self, messages: list[dict]) -> Rendered:
        """The conversation as text plus the character spans the loss mask covers."""
        rendered = self._render_spans(messages)
        answers = [m for m in messages if m["role"] == "assistant"]
        if any("token_ids" in m for m in answers) and len(answers) == len(rendered.spans):
            rendered.span_ids = []
            for m in answers:
                ids = m.get("token_ids")
                if ids is not None and self.decode(ids) != m["content"]:  # edited after generation
                    self.retokenized_answers += 1
                    ids = None
                rendered.span_ids.append(None if ids is None else (ids, m["content"]))
        return rendered

    def _render_spans(self, messages: list[dict]) -> Rendered:
        if self.has_generation_tags:
            text, spans = self._render(messages, spans=True)
            return Rendered(text, [(s, e) for s, e in spans if e > s])
        full = self._render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], add_generation_prompt=True)
            upto = self._render(messages[: k + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise RenderError(TEMPLATE_MISMATCH, f"template is not prefix-stable at message {k}")
            end = self._end_of_turn(upto, len(prompt), len(upto))
            if end > len(prompt):
                spans.append((len(prompt), end))
        return Rendered(full, spans)

    def encode(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize rendered conversations in one batch: (input_ids int32[T], loss_mask uint8[T]) each.

        The text is cut at every span boundary and the pieces are tokenized separately, so no token
        straddles a boundary: the prompt before an answer tokenizes as the target's prompt does at
        inference, and the masked tokens decode to exactly the span text. An answer whose generated
        ids are known (``span_ids``, which decode to its content) keeps them: its span is those ids,
        then the tokens of what the template adds after the content (the end-of-turn token). Answers
        whose ids do not decode to their content (edited after generation), or whose span does not
        start with the content (a template that rewrites it), are tokenized and counted in
        ``retokenized_answers``.
        """
        pieces, flags, counts, given = [], [], [], {}
        for r in rendered:
            cuts = [0, *(c for span in r.spans for c in span), len(r.text)]
            n = 0
            for i in range(len(cuts) - 1):
                if cuts[i + 1] <= cuts[i]:
                    continue
                piece = r.text[cuts[i]:cuts[i + 1]]
                answer = r.span_ids[i // 2] if r.span_ids and i % 2 else None
                if answer is not None:
                    ids, content = answer
                    if piece.startswith(content):
                        given[len(pieces)] = ids
                        piece = piece[len(content):]
                        self.exact_answers += 1
                    else:
                        self.retokenized_answers += 1
                pieces.append(piece)
                flags.append(i % 2)  # odd pieces are spans
                n += 1
            counts.append(n)
        encodings = self.backend.encode_batch_fast(pieces, add_special_tokens=False)
        out, k = [], 0
        for n in counts:
            ids = [np.array(given.get(j, []) + encodings[j].ids, dtype=np.int32) for j in range(k, k + n)]
            mask = [np.full(len(a), f, dtype=np.uint8) for a, f in zip(ids, flags[k:k + n])]
            k += n
            out.append((np.concatenate(ids) if ids else np.zeros(0, np.int32),
                        np.concatenate(mask) if mask else np.zeros(0, np.uint8)))
        return out

    def render_prompt(self, messages: list[dict]) -> str:
        """The conversation so far plus the generation prompt: the text the target continues."""
        return self._render(self.with_system_prompt(messages), add_generation_prompt=True)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)
