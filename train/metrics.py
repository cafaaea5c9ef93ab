"""Training metrics: per-TTT-position loss and accuracy, simulated accept length, throughput, data wait.

Each rank sums its micro-batches' statistics between two logs; ``reduce`` adds them
over ranks (one all-reduce) and turns sums into the logged values:

- ``ce_k`` / ``acc_k``: soft cross-entropy and argmax agreement of TTT step k, over
  its loss-masked positions (step k predicts the (k+1)-th token ahead);
- ``accept_len_3`` = 1 + sum_{i<3} prod_{j<=i} acc_j: the training-time proxy of
  vLLM's mean acceptance length with 3 speculative tokens (1 + accepted / drafts),
  ``accept_len_all`` the same over all TTT steps;
- ``loss``: the optimized objective (train/ttt.py), averaged over micro-batches;
- ``tokens_per_s``: real (unpadded) tokens of all ranks per second of wall time;
- ``data_wait_fraction``: time the step waited for the loader / total step time.

Rank 0 writes every record to TensorBoard (``RUN_DIR/tb``) and ``RUN_DIR/metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch


def simulated_accept_length(accuracies: list[float], num_speculative: Optional[int] = None) -> float:
    """1 + sum_i prod_{j<=i} acc_j over the first ``num_speculative`` positions (all when None)."""
    total, running = 1.0, 1.0
    for acc in accuracies[:num_speculative]:
        running *= acc
        total += running
    return total


class MetricsTracker:
    """Sums one rank's statistics between logs; ``reduce`` is collective (every rank calls it)."""

    def __init__(self, ttt_length: int, device: torch.device):
        self.ttt_length, self.device = ttt_length, device
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(self.ttt_length, 3, dtype=torch.float64)
        self.loss_sum, self.micro_batches, self.tokens = 0.0, 0, 0
        self.wait_s, self.step_s = 0.0, 0.0

    def add_micro_batch(self, loss: torch.Tensor, stats: torch.Tensor, num_tokens: int) -> None:
        self.stats += stats.detach().to("cpu", torch.float64)
        self.loss_sum += float(loss.detach())
        self.micro_batches += 1
        self.tokens += num_tokens

    def add_step_time(self, wait_s: float, step_s: float) -> None:
        self.wait_s += wait_s
        self.step_s += step_s

    def reduce(self, world_size: int) -> dict[str, Any]:
        """Sums over ranks -> the logged values; resets the sums."""
        flat = torch.cat([self.stats.flatten(), torch.tensor(
            [self.loss_sum, self.micro_batches, self.tokens, self.wait_s, self.step_s], dtype=torch.float64)])
        if world_size > 1:
            flat = flat.to(self.device)
            torch.distributed.all_reduce(flat)
            flat = flat.cpu()
        stats = flat[:self.ttt_length * 3].view(self.ttt_length, 3)
        loss_sum, micro_batches, tokens, wait_s, step_s = flat[self.ttt_length * 3:].tolist()
        count = stats[:, 2].clamp_min(1)
        ce, acc = (stats[:, 0] / count).tolist(), (stats[:, 1] / count).tolist()
        wall_s = step_s / world_size  # ranks run side by side
        record = {
            "loss": loss_sum / max(1, micro_batches),
            "accept_len_3": simulated_accept_length(acc, 3),
            "accept_len_all": simulated_accept_length(acc),
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "data_wait_fraction": wait_s / step_s if step_s > 0 else 0.0,
            "tokens": int(tokens),
        }
        record.update({f"ce_{k}": v for k, v in enumerate(ce)})
        record.update({f"acc_{k}": v for k, v in enumerate(acc)})
        self.reset()
        return record


class MetricsWriter:
    """TensorBoard events plus one JSON line per log (rank 0 only).

    A resumed run starts at ``start_step``: what a killed run logged after its last
    checkpoint is dropped from both, so every step appears once.
    """

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step if start_step else None)
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = open(path, "a")

    def write(self, step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            group = "ttt" if key.startswith(("ce_", "acc_")) else "train"
            self.tb.add_scalar(f"{group}/{key}", value, step)
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
