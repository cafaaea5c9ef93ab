"""Shared fixtures: the embedded tiny target (built once per cache key) and the default config."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target():
    """Path of the built tiny target (HF format); built on first use, then cached on disk."""
    from eaglecache.tiny_target.build import ensure_tiny_target

    return ensure_tiny_target()


@pytest.fixture(scope="session")
def tiny_config():
    """configs/tiny.yaml, the CPU default config."""
    from eaglecache.config import load_config

    return load_config(None)
