#!/usr/bin/env bash
# llama.cpp's llama-server, llama-bench and converter from the source PyPI's llama-cpp-python
# ships, for benchmarks only (bench/serve_compare.py, bench/hf_vs_llama_cpp.sh). Builds into
# .venv-bench/llama.cpp/ (git-ignored); needs scripts/bench_env.sh first. Not used by the build,
# the tests, CI or the README commands.
#   bash bench/llama_cpp.sh            # prints the directory holding llama-server
#   bash bench/llama_cpp.sh HF_DIR OUT.gguf   # also converts a model `switchyard export` wrote
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-bench
version=0.3.36
dir=$venv/llama.cpp
if [[ ! -x $venv/bin/python ]]; then
  echo "llama_cpp: $venv is missing: run bash scripts/bench_env.sh first" >&2
  exit 1
fi
src=$dir/llama_cpp_python-$version/vendor/llama.cpp
if [[ ! -d $src ]]; then
  mkdir -p "$dir"
  "$venv/bin/pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$dir"
  tar -xzf "$dir/llama_cpp_python-$version.tar.gz" -C "$dir"
  "$venv/bin/pip" install --quiet sentencepiece gguf
fi
if [[ ! -x $src/build/bin/llama-server || ! -x $src/build/bin/llama-bench ]]; then
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$src/build" --target llama-server llama-bench -j"$(nproc)" >/dev/null
fi
if [[ $# -ge 2 ]]; then
  # Switchyard's byte tokenizer is GPT-2's byte-level BPE with no merges and no split regex;
  # llama.cpp's converter knows pre-tokenizers only by a hash of their output on a test text, and
  # ours is not in its table. With no merges every byte is its own token whatever the split, so
  # declaring it "gpt2" gives the same ids. llama.cpp refuses a BPE vocabulary without merges,
  # so one is written whose result ("\x00\x00") is not a token: a word it would merge falls back
  # to its bytes, the same ids again.
  "$venv/bin/python" - "$src" "$1" "$2" <<'EOF'
import sys
src, hf, out = sys.argv[1:4]
sys.path[:0] = [src, f"{src}/gguf-py"]
sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", "f32"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import gguf
add_to_gguf = gguf.SpecialVocab.add_to_gguf
def add_with_a_merge(self, gw, quiet=False):
    self.merges = self.merges or ["\u0100 \u0100"]
    add_to_gguf(self, gw, quiet)
gguf.SpecialVocab.add_to_gguf = add_with_a_merge
import convert_hf_to_gguf
convert_hf_to_gguf.main()
EOF
fi
echo "$src/build/bin"
