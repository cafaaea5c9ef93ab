"""Speculative-decoding acceptance from vLLM's counters, as the seed's model card reports it.

vLLM counts, per engine: drafts (target steps that verified a draft), draft tokens proposed,
tokens accepted, and tokens accepted at each draft position. From the difference of two
snapshots (before and after one prompt set):

- mean accept length  = 1 + accepted / drafts   (tokens emitted per target step, the bonus included)
- draft accept rate   = accepted / draft tokens
- per-position rate i = accepted at position i / drafts   (share of drafts whose token i was taken)

The same counters come from `LLM.get_metrics()` (offline engine, `disable_log_stats=False`) and
from the Prometheus text of a server's /metrics, so both are parsed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class SpecCounters:
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        width = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        pad = lambda v: list(v) + [0] * (width - len(v))  # noqa: E731
        return SpecCounters(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                            self.accepted - other.accepted,
                            [a - b for a, b in zip(pad(self.accepted_per_pos), pad(other.accepted_per_pos))])

    def acceptance(self) -> dict:
        """The card's figures; None where nothing was drafted."""
        drafts = self.drafts
        return {
            "num_drafts": drafts,
            "num_draft_tokens": self.draft_tokens,
            "num_accepted_tokens": self.accepted,
            "mean_accept_length": 1.0 + self.accepted / drafts if drafts else None,
            "draft_accept_rate": self.accepted / self.draft_tokens if self.draft_tokens else None,
            "per_position_accept_rate": [n / drafts for n in self.accepted_per_pos] if drafts else None,
        }


def counters_from_metrics(metrics) -> SpecCounters:
    """Sum the spec-decode counters of a `LLM.get_metrics()` snapshot over engines."""
    counters = SpecCounters()
    for metric in metrics:
        if metric.name == DRAFTS:
            counters.drafts += int(metric.value)
        elif metric.name == DRAFT_TOKENS:
            counters.draft_tokens += int(metric.value)
        elif metric.name == ACCEPTED:
            counters.accepted += int(metric.value)
        elif metric.name == ACCEPTED_PER_POS:
            values = [int(v) for v in metric.values]
            pad = [0] * max(len(values) - len(counters.accepted_per_pos), 0)
            counters.accepted_per_pos = [a + b for a, b in zip(counters.accepted_per_pos + pad, values)]
    return counters


_SAMPLE = re.compile(r'^(?P<name>[\w:]+?)(?:_total)?(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def counters_from_prometheus(text: str) -> SpecCounters:
    """Sum the spec-decode counters in a Prometheus exposition (a server's /metrics)."""
    counters = SpecCounters()
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        name, value = match["name"], int(float(match["value"]))
        if name == DRAFTS:
            counters.drafts += value
        elif name == DRAFT_TOKENS:
            counters.draft_tokens += value
        elif name == ACCEPTED:
            counters.accepted += value
        elif name == ACCEPTED_PER_POS:
            position = re.search(r'position="(\d+)"', match["labels"] or "")
            if position:
                per_pos[int(position[1])] = per_pos.get(int(position[1]), 0) + value
    counters.accepted_per_pos = [per_pos[i] for i in sorted(per_pos)]
    return counters
