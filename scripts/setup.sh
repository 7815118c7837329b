#!/usr/bin/env bash
# Installs the Debian packages Switchyard builds with, skipping those already present.
# Safe to run again: with everything installed it only checks and exits.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libopenblas-openmp-dev   # BLAS with OpenMP threads: shares one thread pool with our kernels
  libdnnl-dev              # oneDNN: the f32 / bf16 GEMMs of the CPU backends (OpenMP runtime)
  libfmt-dev libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  zlib1g-dev               # reads the gzip'd corpus in data/
  libpcre2-dev             # tokenizer.json split regexes (\p{L} classes, lookahead)
  libutf8proc-dev          # tokenizer.json normalizers (NFC, NFKC)
  libxxhash-dev            # per-tensor checksums in checkpoints
  libcpp-httplib-dev       # switchyard serve: HTTP/1.1
  chromium fonts-dejavu-core  # the serve page's browser test (tests/serve/browser_test.py)
  clang libclang-rt-14-dev # libFuzzer + AddressSanitizer: tests/fuzz
  libopenmpi-dev openmpi-bin  # expert parallelism across processes (mpirun)
  python3                  # tools/extract_udhr.py, run by a test against its fixture
  iproute2                 # network namespaces: the multi-host expert-parallel test
  dataset-fashion-mnist    # Fashion-MNIST IDX files for the vision models (MIT, Zalando)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi
