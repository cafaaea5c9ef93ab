"""Training metrics: per-TTT-position loss and accuracy, simulated accept length, throughput, data wait.

Each rank sums its micro-batches' statistics between two logs; ``reduce`` adds them
over ranks (one all-reduce) and turns sums into the logged values:

- ``ce_k`` / ``acc_k``: soft cross-entropy and argmax agreement of TTT step k, over
  its loss-masked positions (step k predicts the (k+1)-th token ahead);
- ``same_k`` (k >= 1): the share of those positions where step (slot) k's argmax is step k-1's at the
  same position: slots collapsing into one prediction (a DFlash whose mask slots all read the same input
  reaches 1 there while its per-slot accuracy looks merely low); ``repeat_k``: the same for the teacher's
  argmax, the data's own repetition, which ``same_k`` should be near;
- ``accept_len_3``: the mean accept length of vLLM's greedy speculative decoding with 3
  draft tokens (1 + accepted / drafts), simulated on the training tokens by walking
  them the way the decoder does (``decode_walk``); ``accept_len_all`` the same with
  as many draft tokens as TTT steps. Averaging per-step accuracies over all positions
  instead (1 + acc_0 + acc_0 acc_1 + ...) overstates it: the decoder skips through easy
  stretches in a few rounds but visits every position of a hard one;
- ``loss``: the optimized objective (train/ttt.py), averaged over micro-batches;
- ``tokens_per_s``: real (unpadded) tokens of all ranks per second of wall time;
- ``data_wait_fraction``: time the step waited for the loader / total step time.
- ``peak_memory_gib``: rank 0's peak memory so far (GPU: allocated by torch; CPU: resident set).

Rank 0 writes every record to TensorBoard (``RUN_DIR/tb``) and ``RUN_DIR/metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from eaglecache.formats import run as run_format

# the loss's per-step statistics (train/loss.py: CE, correct, positions, same as the slot before, teacher
# repeats) and the decode walk's (train/metrics.py decode_walk: accepted, drafted), in that order
STAT_COLUMNS = 7


def _ahead(mask: torch.Tensor, k: int) -> torch.Tensor:
    """mask[:, t + k] at t (False past the end), of mask's length also when k exceeds it (a short batch)."""
    return torch.nn.functional.pad(mask[:, k:], (0, min(k, mask.shape[1])))


def decode_walk(agree: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Greedy speculative decoding walked over the data: [K, 2] fp64 (accepted, rounds) per draft depth.

    ``agree[k, b, t]``: TTT step k at position t predicted the target's argmax for token t + k + 2
    (train/ttt.py's indexing); ``loss_mask[b, t]``: token t is one the target generated. The decoder
    drafts after each token t + 1 it generated whose successor it also generated (so not after the
    end of a turn), and a draft token counts only inside the turn. With d draft tokens a round at
    t accepts the n <= d leading correct steps; the next round is at t + n + 1 (the target's own
    token follows the accepted ones), or at the next turn. Conditioned on acceptance the draft's
    inputs are the data's tokens, so on the target's own greedy output this is what vLLM measures.
    """
    steps = agree.shape[0]
    generated = loss_mask.bool()
    correct = agree & torch.stack([_ahead(generated, k + 2) for k in range(steps)])
    leading = correct.to(torch.int32).cumprod(dim=0).cumsum(dim=0).cpu()  # [d - 1]: leading correct of d
    active = (_ahead(generated, 1) & _ahead(generated, 2)).cpu()
    totals = torch.zeros(steps, 2, dtype=torch.float64)
    for row in range(active.shape[0]):
        starts = torch.nonzero(active[row]).flatten().tolist()
        if not starts:
            continue
        is_active = active[row].tolist()
        length = len(is_active)
        for depth in range(steps):
            accepted = leading[depth, row].tolist()
            total, rounds, t, next_start = 0, 0, starts[0], 0
            while t < length:
                if not is_active[t]:
                    while next_start < len(starts) and starts[next_start] < t:
                        next_start += 1
                    if next_start == len(starts):
                        break
                    t = starts[next_start]
                total += accepted[t]
                rounds += 1
                t += accepted[t] + 1
            totals[depth, 0] += total
            totals[depth, 1] += rounds
    return totals


class MetricsTracker:
    """Sums one rank's statistics between logs; ``reduce`` is collective (every rank calls it)."""

    def __init__(self, ttt_length: int, device: torch.device):
        self.ttt_length, self.device = ttt_length, device
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(self.ttt_length, STAT_COLUMNS, dtype=torch.float64)
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
        stats = flat[:self.ttt_length * STAT_COLUMNS].view(self.ttt_length, STAT_COLUMNS)
        loss_sum, micro_batches, tokens, wait_s, step_s = flat[self.ttt_length * STAT_COLUMNS:].tolist()
        count = stats[:, 2].clamp_min(1)
        ce, acc = (stats[:, 0] / count).tolist(), (stats[:, 1] / count).tolist()
        same, repeat = (stats[1:, 3] / count[1:]).tolist(), (stats[1:, 4] / count[1:]).tolist()
        walk = (1 + stats[:, 5] / stats[:, 6].clamp_min(1)).tolist()
        wall_s = step_s / world_size  # ranks run side by side
        record = {
            "loss": loss_sum / max(1, micro_batches),
            "accept_len_3": walk[min(3, self.ttt_length) - 1],
            "accept_len_all": walk[-1],
            "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "data_wait_fraction": wait_s / step_s if step_s > 0 else 0.0,
            "tokens": int(tokens),
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        record.update({f"ce_{k}": v for k, v in enumerate(ce)})
        record.update({f"acc_{k}": v for k, v in enumerate(acc)})
        record.update({f"same_{k}": v for k, v in enumerate(same, start=1)})
        record.update({f"repeat_{k}": v for k, v in enumerate(repeat, start=1)})
        self.reset()
        return record


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory so far: what torch allocated on a GPU, the process's resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """TensorBoard events plus one JSON line per log (rank 0 only).

    A resumed run starts at ``start_step``: what a killed run logged after its last
    checkpoint is dropped from both, so every step appears once.
    """

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / run_format.TENSORBOARD), purge_step=start_step if start_step else None)
        path = run_dir / run_format.METRICS
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
