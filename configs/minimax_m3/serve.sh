#!/usr/bin/env bash
# Serve MiniMax-M3 with the trained draft (3 speculative tokens, TP=4), as the seed's card does.
# Resources: one node with 4 GPUs (80 GB class).
#   bash configs/minimax_m3/serve.sh
#   DRY_RUN=1 bash configs/minimax_m3/serve.sh    # print the command only
set -euo pipefail
CONFIG="${CONFIG:-minimax_m3}"  # a file, or the packaged config of that name (eaglecache config list)
DRAFT="${DRAFT:-/data/eaglecache/minimax_m3/draft}"
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"

cmd=(eaglecache serve --config "$CONFIG" --draft "$DRAFT" --port "$PORT" --host "$HOST")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
