#!/usr/bin/env bash
# Quick start, tests: install what the build needs, build, and run the whole ctest suite
# (labels: unit, gradcheck). Extra arguments go to ctest (e.g. -L gradcheck).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j "$(nproc)" "$@"
