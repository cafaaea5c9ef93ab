"""Compute dtypes chosen for the machine: what ``auto`` means, and the warning for a slow forced bf16.

On CUDA GPUs that support bf16, ``auto`` is bf16 everywhere. On CPUs:
- Without native bf16 (no AVX512_BF16 or AMX: AVX2-only CPUs, many cloud AMD instances, most laptops)
  PyTorch's and vLLM's bf16 kernels fall back to generic code about 50x slower than float32. ``auto``
  is float32 for everything, and an explicit bf16 gets one warning.
- With native bf16, the target in vLLM (``target.dtype``) computes in bf16: vLLM's CPU kernels use the
  native dot products and decoding streams half the weight and KV bytes.
- Training (``train.dtype``) is bf16 where bf16 matmuls outrun float32 ones on this CPU, which flags do
  not tell: an AVX512_BF16 Xeon without AMX ran the EAGLE3 step at hidden 1024 in 16.45 s in bf16 and
  8.89 s in float32, an AVX512_BF16 EPYC (Zen 4) without AMX in 5.85 s and 11.22 s. So ``auto`` measures:
  a matmul of the draft's shapes in both dtypes (well under a second), cached per CPU model, torch
  version and kernel capability in ``$EAGLECACHE_HOME/dtype-probe.json`` and logged in one line.

The target's choice follows the processor's CPUID flags, not ``ATEN_CPU_CAPABILITY`` or
``ONEDNN_MAX_CPU_ISA``: those cap the kernels PyTorch dispatches to, not what vLLM's own kernels use.
Stored formats never depend on this: the cache keeps bf16 bits whatever the compute dtype; artifacts
record the compute dtype they were made with.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from eaglecache.home import eaglecache_home

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
    if device == "cuda" or not native_bf16(device):
        return native_bf16(device)
    probe = matmul_probe()
    return probe["bfloat16_gflops"] > probe["float32_gflops"]


# tokens x hidden x intermediate: the draft MLP's matmul at a short sequence; a few tens of ms per dtype
PROBE_SHAPE = (1024, 1024, 2816)
PROBE_REPEATS = 3


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), the key of per-CPU measurements."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def probe_key() -> str:
    return f"{cpu_model()} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()}"


def measure_matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE,
                          repeats: int = PROBE_REPEATS) -> float:
    """Best-of-``repeats`` GFLOP/s of an [m, k] x [k, n] matmul in ``dtype`` at this process's threads."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm-up: kernel selection, page faults of the output
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


@functools.cache
def matmul_probe() -> dict:
    """bf16 vs float32 matmul GFLOP/s on this CPU: read from the per-machine cache, or measured once (under
    a file lock, so the ranks of one run agree) and stored there. Logged in one line per process."""
    path = eaglecache_home() / "dtype-probe.json"
    key = probe_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        probe, how = known.get(key), "cached"
        if probe is None:
            probe = {"float32_gflops": round(measure_matmul_gflops(torch.float32), 1),
                     "bfloat16_gflops": round(measure_matmul_gflops(torch.bfloat16), 1),
                     "threads": torch.get_num_threads(), "shape": list(PROBE_SHAPE)}
            known[key] = probe
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            tmp.replace(path)
            how = "measured"
    chosen = "bfloat16" if probe["bfloat16_gflops"] > probe["float32_gflops"] else "float32"
    log.info("train.dtype auto: %s (bf16 matmul %.0f vs float32 %.0f GFLOP/s at %d thread(s) on %s; %s in %s)",
             chosen, probe["bfloat16_gflops"], probe["float32_gflops"], probe["threads"], key, how, path)
    return probe


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
