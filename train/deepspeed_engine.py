"""DeepSpeed: the ZeRO-3 config generated from TrainConfig, and the engine around the draft.

The JSON is generated, never hand-written, so the YAML stays the one place a
setting lives: bf16 (or fp32), gradient clipping, AdamW, DeepSpeed's
WarmupCosineLR (linear warmup over ``warmup_ratio`` of the steps, cosine down to
``min_lr_ratio * lr``), and gradient accumulation = global_batch_size /
(micro_batch_size * world_size). The optimizer is torch's AdamW (``torch_adam``):
it needs no compiled DeepSpeed op on any accelerator, and the draft is small
enough that the fused kernel would not matter.

Note DeepSpeed's warmup runs at least 2 steps and its first step uses lr 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from eaglecache.errors import UserError
from eaglecache.formats import run as run_format
from eaglecache.train.config import LauncherConfig


def accumulation_steps(train, world_size: int) -> int:
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        raise UserError(f"train.global_batch_size {train.global_batch_size} is not a multiple of "
                        f"micro_batch_size {train.micro_batch_size} x {world_size} ranks")
    return train.global_batch_size // per_pass


def deepspeed_config(train, world_size: int, total_steps: int, compute_dtype: str,
                     load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run with ``total_steps`` optimizer steps in ``compute_dtype``.

    ``compute_dtype`` is ``train.dtype`` resolved for this machine (eaglecache.dtypes); ``load_universal``
    when the run resumes a checkpoint written at another world size (train/checkpoint.py).
    """
    warmup = max(1, int(round(train.warmup_ratio * total_steps)))
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(train, world_size),
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": compute_dtype == "bfloat16"},
        "zero_optimization": {
            "stage": 3,
            "contiguous_gradients": True,
            "overlap_comm": torch.cuda.is_available(),
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                       "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup, "warmup_type": "linear",
                       "warmup_min_ratio": 0.0, "cos_min_ratio": train.min_lr_ratio},
        },
        "steps_per_print": 1 << 30,  # the trainer logs itself
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def create_engine(model: torch.nn.Module, ds_config: dict[str, Any], run_dir: Path | None = None):
    """deepspeed.initialize over the draft's trainable parameters; writes the config beside the run."""
    import deepspeed

    if run_dir is not None and int(torch.distributed.get_rank()) == 0:
        (run_dir / run_format.DEEPSPEED_JSON).write_text(json.dumps(ds_config, indent=1) + "\n")
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine


def init_distributed(collective_timeout_s: Optional[int] = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; gloo on CPU, nccl on CUDA (device set first). A collective
    that waits longer than ``collective_timeout_s`` raises (train/peer_loss.py names the node that went away)."""
    import os
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if collective_timeout_s is None:
        collective_timeout_s = LauncherConfig().collective_timeout_s
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo",
                               timeout=timedelta(seconds=collective_timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return rank, world, torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
