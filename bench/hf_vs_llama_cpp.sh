#!/usr/bin/env bash
# llama.cpp on the models bench/hf_vs_transformers.py made (a published MoE's shapes, random
# weights, bf16): converted to GGUF at bf16 with llama.cpp's own converter, then llama-bench's
# prefill (pp) and batch-1 decode (tg) tokens/s on the same threads. Benchmarks only; needs
# scripts/bench_env.sh and bench/llama_cpp.sh first.
#   bash bench/hf_vs_llama_cpp.sh /tmp/sy_bench_qwen3-30b-a3b_2l 2
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: hf_vs_llama_cpp.sh HF_DIR [THREADS]}
threads=${2:-2}
venv=.venv-bench
bin=$(bash bench/llama_cpp.sh | tail -1)
src=$(dirname "$(dirname "$bin")")
gguf=$model/model-bf16.gguf
if [[ ! -f $gguf ]]; then
  # The random models carry a small fixture tokenizer; llama.cpp's converter knows BPE
  # pre-tokenizers only by a hash of their output on a test text, and this one is not in its
  # table. llama-bench feeds token ids, not text, so any known pre-tokenizer name serves.
  "$venv/bin/python" - "$src" "$model" "$gguf" <<'PY'
import sys
src, hf, out = sys.argv[1:4]
sys.path[:0] = [src, f"{src}/gguf-py"]
sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", out, "--outtype", "bf16"]
import json
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
# The fixture tokenizer is smaller than the embedding; the SentencePiece path (Mixtral) does not
# pad its vocabulary to vocab_size, so pad every token list here as the BPE path does.
import gguf
vocab = json.load(open(f"{hf}/config.json"))["vocab_size"]
def padded(add, fill):
    def wrapped(self, values):
        values = list(values)
        return add(self, values + [fill(i) for i in range(len(values), vocab)])
    return wrapped
W = gguf.GGUFWriter
W.add_token_list = padded(W.add_token_list, lambda i: f"[PAD{i}]")
W.add_token_scores = padded(W.add_token_scores, lambda i: -1000.0)
W.add_token_types = padded(W.add_token_types, lambda i: gguf.TokenType.UNUSED)
import convert_hf_to_gguf
convert_hf_to_gguf.main()
PY
fi
"$bin/llama-bench" -m "$gguf" -t "$threads" -p 512,2048 -n 16 -b 2048 -ub 512 -r 2 -o md
