#!/usr/bin/env python3
"""Checks a directory written by `switchyard export` in transformers itself: it must load with
AutoModelForCausalLM.from_pretrained and continue a prompt greedily exactly as
`switchyard generate --model DIR` does.

  bash scripts/bench_env.sh
  build/switchyard export --checkpoint runs/austen-moe --out /tmp/austen-hf
  .venv-bench/bin/python tools/check_export.py /tmp/austen-hf build/switchyard
"""
import subprocess
import sys

import torch
import transformers

directory, binary = sys.argv[1], sys.argv[2]
prompt, n = "Emma Woodhouse was", 64
tok = transformers.AutoTokenizer.from_pretrained(directory)
model = transformers.AutoModelForCausalLM.from_pretrained(
    directory, dtype=torch.float32, attn_implementation="eager").eval()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    cache = transformers.DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True)
    greedy, margin = [], float("inf")
    for _ in range(n):
        top = out.logits[0, -1].topk(2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        greedy.append(int(top.indices[0]))
        out = model(torch.tensor([[greedy[-1]]]), past_key_values=cache, use_cache=True)
theirs = prompt + tok.decode(greedy)
ours = subprocess.run([binary, "generate", "--model", directory, "--prompt", prompt, "--tokens",
                       str(n), "--temperature", "0"], capture_output=True, text=True,
                      check=True).stdout
print(f"transformers {transformers.__version__}: {theirs!r}")
print(f"switchyard:            {ours!r}")
print(f"smallest top-1 margin over the {n} steps: {margin:.4f}")
sys.exit(0 if ours == theirs else 1)
