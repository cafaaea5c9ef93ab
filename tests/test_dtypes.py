"""Compute dtypes follow the machine: the target computes in bf16 where it is native, training only where it
is faster than float32 (CUDA, AMX CPUs); an explicit bf16 without native support gets a warning."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from eaglecache import dtypes
from eaglecache.config import load_config
from eaglecache.train.deepspeed_engine import deepspeed_config

NATIVE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
AMX = torch.cpu._is_amx_tile_supported()


def test_auto_is_bf16_where_native_for_the_target_and_with_amx_for_training():
    assert dtypes.cpu_has_native_bf16() == NATIVE
    assert dtypes.resolve_dtype("auto", "target.dtype", "cpu") == ("bfloat16" if NATIVE else "float32")
    assert dtypes.resolve_dtype("auto", "train.dtype", "cpu", training=True) == ("bfloat16" if AMX else "float32")
    capped = bool(os.environ.get("ATEN_CPU_CAPABILITY"))
    if NATIVE and not capped:
        # AVX512_BF16 implies AVX-512, so PyTorch's own dispatch must have picked an AVX-512 kernel set
        assert torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {NATIVE}, AMX {AMX}")


def test_the_choice_follows_the_cpu_not_the_dispatch_caps():
    code = ("import torch; from eaglecache.dtypes import resolve_dtype; "
            "print(torch.backends.cpu.get_cpu_capability(), resolve_dtype('auto', 'x', 'cpu'))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    capability, chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()
    assert capability == "AVX2"  # the cap took effect on dispatch...
    assert chosen == ("bfloat16" if NATIVE else "float32")  # ...and the choice still follows the CPU


def test_forced_bf16_on_a_cpu_without_it_warns_once_and_is_honoured(monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    dtypes._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="eaglecache.dtypes"):
        assert dtypes.resolve_dtype("auto", "train.dtype", "cpu") == "float32"
        assert not caplog.records
        assert dtypes.resolve_dtype("bfloat16", "train.dtype", "cpu") == "bfloat16"
        assert dtypes.resolve_dtype("bfloat16", "train.dtype", "cpu") == "bfloat16"
        assert dtypes.resolve_dtype("float32", "train.dtype", "cpu") == "float32"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "train.dtype" in warnings[0] and "about 50x slower" in warnings[0]
    dtypes._warn_once.cache_clear()


def test_configs_resolve_auto_where_they_are_used(monkeypatch):
    config = load_config()
    assert config.target.dtype == "auto" and config.train.dtype == "auto"
    expected = "bfloat16" if NATIVE else "float32"
    assert config.target.vllm_engine_args()["dtype"] == expected
    assert config.target.compute_dtype("cpu") == expected
    monkeypatch.setattr(dtypes, "native_bf16", lambda device: False)
    assert config.target.vllm_engine_args()["dtype"] == "float32"
    monkeypatch.setattr(dtypes, "native_bf16", lambda device: True)
    assert config.target.vllm_engine_args()["dtype"] == "bfloat16"
    assert deepspeed_config(config.train, 2, 10, "float32")["bf16"]["enabled"] is False
    assert deepspeed_config(config.train, 2, 10, "bfloat16")["bf16"]["enabled"] is True


@pytest.mark.parametrize("amx, train_dtype", [(False, "float32"), (True, "bfloat16")])
def test_avx512_bf16_without_amx_trains_in_float32_and_serves_in_bf16(monkeypatch, amx, train_dtype):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dtypes.resolve_dtype("auto", "target.dtype", "cpu") == "bfloat16"
    assert dtypes.resolve_dtype("auto", "train.dtype", "cpu", training=True) == train_dtype
