#!/usr/bin/env bash
# Train the MiniMax-M3 EAGLE3 draft with DeepSpeed ZeRO-3 over several nodes.
# `eaglecache train` starts DeepSpeed's own launcher with train.launcher from the config
# (num_gpus per node, num_nodes, hostfile): run this once, on the first host of the hostfile.
# Resources: 4 nodes x 8 GPUs (80 GB class) by default, passwordless ssh between the hosts,
# the cache and the target's safetensors (for the shared embedding and LM head) on a shared filesystem.
#   bash configs/minimax_m3/train.sh
#   DRY_RUN=1 bash configs/minimax_m3/train.sh     # print the commands only
set -euo pipefail
CONFIG="${CONFIG:-minimax_m3}"  # a file, or the packaged config of that name (eaglecache config list)
CACHE="${CACHE:-/data/eaglecache/minimax_m3/cache}"
RUN="${RUN:-/data/eaglecache/minimax_m3/runs/draft}"
HOSTFILE="${HOSTFILE:-/etc/eaglecache/hostfile}"
NUM_NODES="${NUM_NODES:-4}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"

cmd=(eaglecache train --config "$CONFIG" --cache "$CACHE" --output "$RUN"
     train.launcher.hostfile="$HOSTFILE" train.launcher.num_nodes="$NUM_NODES"
     train.launcher.num_gpus="$GPUS_PER_NODE")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
