#!/usr/bin/env bash
# The GPU check: the CUDA path end to end on one GPU, at most ~8 minutes on one H100, in one command:
#   bash scripts/gpu_check.sh [OUTPUT_DIR]          (default runs/gpu-check; must not hold an earlier check)
# It runs `eaglecache demo` on CUDA at the CI demo's size: the tiny target (built once, or taken from
# ~/.cache/eaglecache), regeneration and precompute in vLLM's CUDA build, 100 training steps in bf16 on
# DeepSpeed ZeRO-3 over NCCL with flex attention, export, and the acceptance bench in vLLM; then the same
# 100 steps on the CPU (2 ranks, gloo) from the same cache, for the same-run comparison; then prints one
# table (benchmarks/gpu_report.py): precompute and training tokens/s, data wait, peak memory, mean
# accept length, GPU vs CPU. The project must be installed first (`bash scripts/install.sh`, which picks
# the CUDA vLLM wheel on a machine with an NVIDIA driver).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: no CUDA device visible to torch: the GPU check needs one (the CPU path is what the tests run)" >&2
  exit 2
fi
if [ -e "$out/gpu" ] || [ -e "$out/cpu-train" ]; then
  echo "error: $out holds an earlier check; give another OUTPUT_DIR or remove it" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
size=(serve.demo.num_conversations=600 serve.demo.bench_prompts=64 train.max_steps=100)
eaglecache demo --output "$out/gpu" "${size[@]}" train.dtype=bfloat16 train.attention=flex \
  train.launcher.num_gpus=1 2>&1 | tee "$out/gpu.log"
# the same steps on the CPU, from the same cache and config: DeepSpeed's CPU accelerator, 2 ranks
DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" eaglecache train --cache "$out/gpu/cache" --output "$out/cpu-train" \
  --config "$out/gpu/config.yaml" train.attention=auto train.dtype=auto train.launcher.num_gpus=2 \
  2>&1 | tee "$out/cpu.log"
python benchmarks/gpu_report.py --demo "$out/gpu" --cpu-run "$out/cpu-train" | tee "$out/report.md"
