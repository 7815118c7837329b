#!/usr/bin/env bash
# Runs on the lent GPU machine (see bench/README.md): the CUDA tests, then the CUDA benchmark
# and the PyTorch reference side by side. Expects a CUDA build (made here in build-cuda/ with
# -DSY_WITH_CUDA=ON -DSY_NATIVE=OFF), its binaries copied to .devbin/, and the Debian shared
# libraries they link in .devlibs/.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/.devlibs:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
out="${OUT:-/tmp/sy_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The test binaries directly: ctest's files hold this machine's absolute paths.
for t in moe_cuda_test moe_test kernels_test; do
  ./.devbin/$t --gtest_brief=1 2>&1 | tail -n 4
done
./.devbin/switchyard bench moe --device cuda --json "$out/cuda.json" "$@"
python3 bench/torch_moe.py --json "$out/torch.json" "$@"
