"""Compute dtypes chosen for the machine: what ``auto`` means, and the warning for a slow forced bf16.

bf16 is faster than float32 only on CUDA GPUs that support it and on CPUs with AMX tiles. CPUs with
AVX512_BF16 but no AMX compute bf16 natively, yet slower than float32 (2 cores of such a Xeon: matmul
peaks of 160 GFLOP/s in bf16, 298 in float32). AVX2-only CPUs (many cloud AMD instances, most
laptops) have no bf16 at all: PyTorch's and vLLM's bf16 CPU kernels fall back to generic code about
50x slower than float32 (a 1024x1024 matmul on one thread of an AVX2-only EPYC: 0.7 GFLOP/s in bf16,
37.8 in float32). So ``auto`` is bf16 on CUDA and AMX, float32 elsewhere, and an explicit bf16 on a
CPU without native bf16 gets one warning.

The choice follows the processor itself (its CPUID flags), not ``ATEN_CPU_CAPABILITY`` or
``ONEDNN_MAX_CPU_ISA``: those variables cap the kernels PyTorch dispatches to without changing what the
machine can do. Stored formats never depend on this: the cache keeps bf16 bits whatever the compute
dtype; artifacts record the compute dtype they were made with.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SLOW_BF16_WARNING = ("{what}: bfloat16 on a CPU without native bf16 (no AVX512_BF16 or AMX): expect it to run "
                     "about 50x slower than float32; set it to auto or float32")


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 arithmetic natively (AVX512_BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_is_faster(device: str) -> bool:
    """True when bf16 outruns float32 on ``device`` ("cuda" or "cpu") of this machine: what ``auto`` picks."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str, what: str, device: str | None = None) -> str:
    """The compute dtype name for a configured ``requested`` ("auto" or a dtype) on ``device``.

    ``what`` names the setting in the one warning line given when an explicit bf16 will be slow here,
    e.g. "train.dtype".
    """
    device = device or default_device()
    if requested == AUTO:
        return "bfloat16" if bf16_is_faster(device) else "float32"
    if requested == "bfloat16" and device == "cpu" and not cpu_has_native_bf16():
        _warn_once(what)
    return requested


@functools.cache
def _warn_once(what: str) -> None:
    log.warning(SLOW_BF16_WARNING.format(what=what))
