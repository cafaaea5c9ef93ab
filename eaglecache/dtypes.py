"""Compute dtypes chosen for the machine: what ``auto`` means, and the warning for a slow forced bf16.

On CUDA GPUs that support bf16, ``auto`` is bf16 everywhere. On CPUs it depends on the hardware and
on the work:
- AVX2-only CPUs (many cloud AMD instances, most laptops) have no bf16: PyTorch's and vLLM's bf16 CPU
  kernels fall back to generic code about 50x slower than float32 (a 1024x1024 matmul on one thread of
  an AVX2-only EPYC: 0.7 GFLOP/s in bf16, 37.8 in float32). ``auto`` is float32, and an explicit bf16
  gets one warning.
- AVX512_BF16 without AMX runs bf16 natively, but training is faster in float32: the EAGLE3 step at
  hidden 1024 took 16.45 s in bf16 and 8.89 s in float32 on 2 cores of such a Xeon (matmul peaks 160
  vs 298 GFLOP/s). So ``auto`` for training (``train.dtype``) is bf16 only with AMX, while ``auto`` for
  the target in vLLM (``target.dtype``) stays bf16 there: vLLM's CPU kernels use the native bf16 dot
  products and decoding streams half the weight and KV bytes.
- AMX CPUs: bf16 for both.

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


def native_bf16(device: str) -> bool:
    """True when bf16 runs natively on ``device`` ("cuda" or "cpu") of this machine: ``auto`` for the target."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def bf16_trains_faster(device: str) -> bool:
    """True when training in bf16 outruns float32 on ``device``: ``auto`` for ``train.dtype``."""
    if device == "cuda":
        return native_bf16(device)
    return bool(torch.cpu._is_amx_tile_supported())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: str, what: str, device: str | None = None, *, training: bool = False) -> str:
    """The compute dtype name for a configured ``requested`` ("auto" or a dtype) on ``device``.

    ``what`` names the setting in the one warning line given when an explicit bf16 will be slow here,
    e.g. "train.dtype"; ``training`` picks the training rule of ``auto`` (module docstring).
    """
    device = device or default_device()
    if requested == AUTO:
        fast = bf16_trains_faster(device) if training else native_bf16(device)
        return "bfloat16" if fast else "float32"
    if requested == "bfloat16" and device == "cpu" and not cpu_has_native_bf16():
        _warn_once(what)
    return requested


@functools.cache
def _warn_once(what: str) -> None:
    log.warning(SLOW_BF16_WARNING.format(what=what))
