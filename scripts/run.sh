#!/usr/bin/env bash
# Quick start, main job: install what the build needs, build, and train the default model
# (austen-moe: a 4-layer byte-level MoE transformer on Jane Austen's novels, data/) with a live
# progress line; about 6 minutes on 2 cores (Intel Xeon family 6 model 207) once built. Each run gets its own directory under runs/, so a
# second run never touches the first one's checkpoint. Extra arguments go to `switchyard train`
# (e.g. --steps 50, --config austen-dense, --set train.lr=0.001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
out="runs/austen-moe-$(date +%Y%m%d-%H%M%S)"
./build/switchyard train --config austen-moe --out "$out" "$@"
echo "try: ./build/switchyard generate --checkpoint $out/checkpoint.safetensors --prompt 'It is a truth'"
