#!/usr/bin/env python3
"""Switchyard against transformers on one model that both load: the shapes of a published MoE
(default Qwen3-30B-A3B: d 2048, 128 experts, top-8, expert width 768, 32 query / 4 kv heads of
128, vocab 151936) cut to a few layers, random weights from transformers' own initialisation,
saved once in bf16.

  bash scripts/bench_env.sh
  .venv-bench/bin/python bench/hf_vs_transformers.py --layers 2 --threads 2

Prefill tokens/s at --prefill tokens (logits of the last position only, as generation needs)
and decode tokens/s at batch 1 (greedy, KV cache), both in
one run on the same threads; transformers in bf16 with each experts_implementation it offers.
Switchyard runs `switchyard generate --model` (f32 compute, bf16 weights).
"""
import argparse
import os
import re
import subprocess
import time

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prefill", type=int, default=512)
ap.add_argument("--decode", type=int, default=16)
ap.add_argument("--dir", default="/tmp/sy_bench_qwen3_30b_a3b")
ap.add_argument("--binary", default="build/switchyard")
args = ap.parse_args()
torch.set_num_threads(args.threads)
root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

if not os.path.exists(os.path.join(args.dir, "config.json")):
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.dir)
    # A byte-level tokenizer from the fixtures: its ids are a subset of the vocabulary.
    import shutil
    shutil.copy(os.path.join(root, "tests/fixtures/hf/models/qwen3_moe/tokenizer.json"), args.dir)

tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.dir, "tokenizer.json"))
import gzip
with gzip.open(os.path.join(root, "data/austen.txt.gz"), "rt") as f:
    text = f.read(200_000)
ids = tok(text).input_ids[: args.prefill]
prompt = tok.decode(ids)
ids = tok(prompt).input_ids
print(f"model: {args.dir}, {args.layers} layers, prompt {len(ids)} tokens, threads {args.threads}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")


def run_transformers(impl):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        args.dir, dtype=torch.bfloat16, experts_implementation=impl).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = transformers.DynamicCache(config=m.config)
        out = m(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        nxt = out.logits[0, -1].argmax()
        t0 = time.perf_counter()
        for _ in range(args.decode):
            out = m(nxt.view(1, 1), past_key_values=cache, use_cache=True)
            nxt = out.logits[0, -1].argmax()
        decode = time.perf_counter() - t0
    return len(ids) / prefill, args.decode / decode


def run_switchyard():
    r = subprocess.run([args.binary, "generate", "--model", args.dir, "--prompt", prompt,
                        "--tokens", str(args.decode), "--temperature", "0", "--threads",
                        str(args.threads)], capture_output=True, text=True, check=True)
    pre = float(re.search(r"prefill of \d+ tokens in [\d.]+ s: (\d+) tokens/s", r.stderr).group(1))
    dec = float(re.search(r"\[(\d+) tokens in [\d.]+ s: (\d+) tokens/s", r.stderr).group(2))
    cpu = re.search(r"on (.*?), isa", r.stderr).group(1)
    return pre, dec, cpu


sy_pre, sy_dec, cpu = run_switchyard()
print(f"cpu: {cpu}")
print(f"switchyard            prefill {sy_pre:8.1f} tok/s   decode b1 {sy_dec:6.2f} tok/s")
for impl in ("eager", "grouped_mm", "batched_mm"):
    try:
        pre, dec = run_transformers(impl)
    except Exception as e:  # an implementation this torch build lacks
        print(f"transformers {impl:10s} failed: {type(e).__name__}: {str(e)[:100]}")
        continue
    print(f"transformers {impl:10s} prefill {pre:8.1f} tok/s   decode b1 {dec:6.2f} tok/s   "
          f"switchyard/transformers: prefill {sy_pre / pre:.2f}x, decode {sy_dec / dec:.2f}x")
