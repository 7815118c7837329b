#!/usr/bin/env bash
# Installs the peers the benchmarks compare against and the fixture tools run on (PyTorch,
# transformers and tokenizers from PyPI, pinned so that tests/fixtures/hf/ can be remade alike)
# into a git-ignored virtual environment, .venv-bench/. Not needed by the build, the tests, CI
# or the quick start; only by bench/torch_*.py. Safe to run again: an existing environment is
# only checked. Prints the path of its python.
#   bash scripts/bench_env.sh && .venv-bench/bin/python bench/torch_moe.py --device cpu
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-bench
if ! python3 -m venv --help >/dev/null 2>&1; then
  echo "bench_env: python3 -m venv is missing (Debian: apt-get install python3-venv)" >&2
  exit 1
fi
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, transformers, tokenizers, safetensors, fastapi, uvicorn" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet torch==2.15.0 "transformers[serving]==5.24.0" tokenizers==0.23.3 safetensors numpy
fi
"$venv/bin/python" -c "import torch, transformers; print('bench_env: torch', torch.__version__, 'transformers', transformers.__version__)" >&2
echo "$venv/bin/python"
