#!/usr/bin/env bash
# Configures and builds Switchyard (Release) into build/, with tests and benchmarks. Where
# CUDA's compiler is installed (/usr/local/cuda/bin/nvcc) the CUDA backend is built too, for
# Hopper (sm_90a); its tests skip themselves on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=OFF
if [[ -x /usr/local/cuda/bin/nvcc ]]; then cuda=ON; fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DSY_WITH_CUDA="$cuda" >/dev/null
cmake --build build -j "$(nproc)"
