"""Compute dtypes follow the machine: the target computes in bf16 where the CPU has it natively, training
where a measured bf16 matmul outruns float32 (cached per CPU); an explicit bf16 without native support gets
a warning."""

import json
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


@pytest.fixture
def probe_home(tmp_path, monkeypatch):
    """A fresh per-machine cache for the probe, and the probe's in-process memo cleared around the test."""
    monkeypatch.setenv("EAGLECACHE_HOME", str(tmp_path))
    dtypes.matmul_probe.cache_clear()
    yield tmp_path
    dtypes.matmul_probe.cache_clear()


def fake_matmul(monkeypatch, gflops: dict[torch.dtype, float]) -> list[torch.dtype]:
    """Replace the measurement with fixed figures; returns the list of dtypes measured."""
    measured = []
    monkeypatch.setattr(dtypes, "measure_matmul_gflops", lambda dtype: measured.append(dtype) or gflops[dtype])
    return measured


def test_auto_for_the_target_is_bf16_where_native():
    assert dtypes.cpu_has_native_bf16() == NATIVE
    assert dtypes.resolve_dtype("auto", "target.dtype", "cpu") == ("bfloat16" if NATIVE else "float32")
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {NATIVE}")


@pytest.mark.parametrize("flags_native, capability, expected", [
    (True, "AVX2", "bfloat16"),  # dispatch capped below what the CPU has (ATEN_CPU_CAPABILITY=avx2)
    (False, "AVX512", "float32"),  # AVX-512 kernels, but no bf16 instructions (Skylake-X, Zen 3)
])
def test_the_target_choice_follows_the_cpu_flags_not_the_dispatch_caps(monkeypatch, flags_native, capability,
                                                                       expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags_native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert dtypes.resolve_dtype("auto", "target.dtype", "cpu") == expected


@pytest.mark.skipif(not NATIVE, reason="needs a CPU with native bf16 to cap")
def test_capping_the_dispatch_of_a_real_bf16_cpu_keeps_the_target_in_bf16():
    code = ("import torch; from eaglecache.dtypes import resolve_dtype; "
            "print(torch.backends.cpu.get_cpu_capability(), resolve_dtype('auto', 'x', 'cpu'))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    capability, chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()
    assert (capability, chosen) == ("AVX2", "bfloat16")


@pytest.mark.parametrize("bf16, fp32, expected", [(425.0, 193.0, "bfloat16"), (160.0, 298.0, "float32")])
def test_auto_training_dtype_is_the_faster_one_measured(monkeypatch, probe_home, caplog, bf16, fp32, expected):
    """Zen 4 (bf16 2.2x faster) and an AVX512_BF16 Xeon without AMX (bf16 1.9x slower): the same flags."""
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    measured = fake_matmul(monkeypatch, {torch.bfloat16: bf16, torch.float32: fp32})
    with caplog.at_level(logging.INFO, logger="eaglecache.dtypes"):
        assert dtypes.resolve_dtype("auto", "train.dtype", "cpu", training=True) == expected
        assert dtypes.resolve_dtype("auto", "train.dtype", "cpu", training=True) == expected
    assert sorted(measured, key=str) == [torch.bfloat16, torch.float32]  # once per process
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"train.dtype auto: {expected} (bf16 matmul {bf16:.0f} vs "
                                                   f"float32 {fp32:.0f} GFLOP/s"), lines
    assert dtypes.resolve_dtype("auto", "target.dtype", "cpu") == "bfloat16"  # the target keeps the flags' rule


def test_the_probe_is_measured_once_per_cpu_and_torch_version(monkeypatch, probe_home):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    measured = fake_matmul(monkeypatch, {torch.bfloat16: 200.0, torch.float32: 100.0})
    assert dtypes.bf16_trains_faster("cpu")
    stored = json.loads((probe_home / "dtype-probe.json").read_text())
    assert list(stored) == [dtypes.probe_key()] and dtypes.cpu_model() in dtypes.probe_key()
    assert torch.__version__ in dtypes.probe_key()
    dtypes.matmul_probe.cache_clear()  # a new process on the same machine reads the file
    remeasured = fake_matmul(monkeypatch, {torch.bfloat16: 1.0, torch.float32: 100.0})
    assert dtypes.bf16_trains_faster("cpu") and len(measured) == 2 and remeasured == []
    dtypes.matmul_probe.cache_clear()  # another torch (or CPU) measures again
    monkeypatch.setattr(dtypes, "probe_key", lambda: "another cpu | torch 9.9")
    assert not dtypes.bf16_trains_faster("cpu") and len(remeasured) == 2
    assert len(json.loads((probe_home / "dtype-probe.json").read_text())) == 2


def test_no_probe_without_native_bf16_and_explicit_dtypes_win(monkeypatch, probe_home):
    measured = fake_matmul(monkeypatch, {torch.bfloat16: 500.0, torch.float32: 100.0})
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert dtypes.resolve_dtype("auto", "train.dtype", "cpu", training=True) == "float32"
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert dtypes.resolve_dtype("float32", "train.dtype", "cpu", training=True) == "float32"
    assert dtypes.resolve_dtype("bfloat16", "train.dtype", "cpu", training=True) == "bfloat16"
    assert measured == [] and not (probe_home / "dtype-probe.json").exists()


def test_the_real_probe_on_this_cpu(probe_home):
    if not NATIVE:
        pytest.skip("no native bf16: auto is float32 without measuring")
    probe = dtypes.matmul_probe()
    assert probe["float32_gflops"] > 0 and probe["bfloat16_gflops"] > 0
    print(f"{dtypes.probe_key()}: bf16 {probe['bfloat16_gflops']} vs float32 {probe['float32_gflops']} GFLOP/s "
          f"at {probe['threads']} thread(s)")


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
