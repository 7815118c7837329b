#!/usr/bin/env bash
# Quick start, main job: install what the build needs, build, and run the MoE layer benchmark
# (shapes A, B and decode C against the dense sgemm and copy bandwidth of this machine).
# Extra arguments go to `switchyard bench moe` (e.g. --shape A --json out.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
./build/switchyard bench moe "$@"
