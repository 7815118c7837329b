#!/usr/bin/env python3
"""Switchyard against transformers on one model that both load: the shapes of a published MoE cut
to a few layers, random weights from transformers' own initialisation, saved once in bf16.

  bash scripts/bench_env.sh
  .venv-bench/bin/python bench/hf_vs_transformers.py --shape qwen3-30b-a3b --layers 2 --threads 2

Shapes: qwen3-30b-a3b (d 2048, 128 experts, top-8, expert width 768, 32 query / 4 kv heads of
128, vocab 151936) and mixtral-8x7b (d 4096, 8 experts, top-2, width 14336, 32 / 8 heads of 128,
vocab 32000). Both sides, same threads, same prompts (the text as the fixture tokenizer cuts it):
prefill tokens/s at each --prefill length (logits of the last position only, the faster of two
runs after a warm-up) and decode tokens/s at each --batch (every sequence first holds --context
tokens; greedy; median of --steps steps). Switchyard runs `switchyard bench model` (which also
measures the copy bandwidth and the weight-read ceiling) at each --precision; transformers runs
in bf16 with each experts_implementation it offers, each in its own process under a memory limit,
so that one that runs out of memory is reported and the others still run.
"""
import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time

SHAPES = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                          tokenizer="qwen3_moe"),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         tokenizer="mixtral"),
}

ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prefill", default="512,2048")
ap.add_argument("--batch", default="1,8")
ap.add_argument("--steps", type=int, default=16)
ap.add_argument("--context", type=int, default=128)
ap.add_argument("--precision", default="f32,bf16", help="Switchyard's GEMM precisions to run")
ap.add_argument("--impls", default="eager,grouped_mm,batched_mm")
ap.add_argument("--dir", default=None, help="default: /tmp/sy_bench_<shape>_<layers>l")
ap.add_argument("--binary", default="build/switchyard")
ap.add_argument("--json", default=None, help="write every figure here")
ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
args = ap.parse_args()
root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
args.dir = args.dir or f"/tmp/sy_bench_{args.shape}_{args.layers}l"
prefills = [int(x) for x in args.prefill.split(",")]
batches = [int(x) for x in args.batch.split(",")]

import torch  # noqa: E402  (after argparse: --help needs no torch)
import transformers  # noqa: E402

torch.set_num_threads(args.threads)


def make_model():
    if os.path.exists(os.path.join(args.dir, "config.json")):
        return
    shape = dict(SHAPES[args.shape])
    tokenizer = shape.pop("tokenizer")
    model_type = shape.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, num_hidden_layers=args.layers, **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(args.dir)
    # A fixture tokenizer of the same family: its ids are a subset of the vocabulary.
    shutil.copy(os.path.join(root, f"tests/fixtures/hf/models/{tokenizer}/tokenizer.json"),
                args.dir)


def token_ids():
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(args.dir, "tokenizer.json"))
    with gzip.open(os.path.join(root, "data/austen.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    # The validation split `switchyard bench model` reads: the last 5% of the text's bytes.
    raw = text.encode("utf-8")
    val = raw[len(raw) - int(len(raw) * 0.05):]
    need = max(max(prefills), args.context * max(batches))
    ids = tok(val[: need * 16].decode("utf-8", errors="replace"), add_special_tokens=False).input_ids
    while len(ids) < need:
        ids = ids + ids
    return ids


def run_transformers(impl):
    ids = token_ids()
    m = transformers.AutoModelForCausalLM.from_pretrained(
        args.dir, dtype=torch.bfloat16, experts_implementation=impl).eval()
    out = {"impl": impl, "prefill": [], "decode": []}
    with torch.no_grad():
        m(torch.tensor([ids[:64]]), logits_to_keep=1)  # warm-up
        for L in prefills:
            best = 1e30
            for _ in range(2):
                t0 = time.perf_counter()
                m(torch.tensor([ids[:L]]), use_cache=True, logits_to_keep=1)
                best = min(best, time.perf_counter() - t0)
            out["prefill"].append({"tokens": L, "seconds": best, "tokens_per_s": L / best})
        for B in batches:
            x = torch.tensor([ids[b * args.context:(b + 1) * args.context] for b in range(B)])
            cache = transformers.DynamicCache(config=m.config)
            r = m(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = r.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                r = m(nxt, past_key_values=cache, use_cache=True)
                nxt = r.logits[:, -1].argmax(-1, keepdim=True)
                steps.append(time.perf_counter() - t0)
            med = sorted(steps)[len(steps) // 2]
            out["decode"].append({"batch": B, "step_median_s": med, "tokens_per_s": B / med})
    return out


if args.worker:
    # Past this the allocation fails with an error instead of the kernel killing the machine's
    # other processes.
    limit = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        print(json.dumps(run_transformers(args.worker)))
    except Exception as e:  # an implementation this torch build lacks, or out of memory
        print(json.dumps({"impl": args.worker, "error": f"{type(e).__name__}: {str(e)[:160]}"}))
    sys.exit(0)

make_model()
results = {"shape": args.shape, "layers": args.layers, "threads": args.threads,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "switchyard": [], "transformers_runs": []}
for prec in args.precision.split(","):
    r = subprocess.run([args.binary, "bench", "model", "--model", args.dir, "--prefill",
                        args.prefill, "--batch", args.batch, "--steps", str(args.steps),
                        "--context", str(args.context), "--threads", str(args.threads),
                        "--precision", prec, "--json", "-"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"switchyard bench model failed ({r.returncode}): {r.stderr[-2000:]}")
    text = r.stdout
    j = json.loads(text[text.index("{\n"):])
    j["precision"] = prec
    results["switchyard"].append(j)
    print(text[:text.index("{\n")], end="")
for impl in args.impls.split(","):
    r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", impl],
                       capture_output=True, text=True)
    try:
        j = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        j = {"impl": impl, "error": f"exit {r.returncode}: {r.stderr[-300:]}"}
    results["transformers_runs"].append(j)

cpu = results["switchyard"][0]["cpu"]
print(f"\n{args.shape} cut to {args.layers} layers, {args.threads} threads, {cpu}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
head = "| | " + " | ".join(f"prefill {L} tok/s" for L in prefills) + " | " + \
       " | ".join(f"decode b{B} tok/s" for B in batches) + " |"
print(head)
print("|---" * (1 + len(prefills) + len(batches)) + "|")
for s in results["switchyard"]:
    cells = [f"{p['tokens_per_s']:.1f}" for p in s["prefill"]] + \
            [f"{d['tokens_per_s']:.1f} ({d['vs_ceiling']:.2f} of ceiling)" for d in s["decode"]]
    print(f"| Switchyard {s['precision']} ({s['kernels']}) | " + " | ".join(cells) + " |")
ok = [t for t in results["transformers_runs"] if "error" not in t]
for t in results["transformers_runs"]:
    if "error" in t:
        print(f"| transformers bf16, experts {t['impl']} | failed: {t['error']} |")
        continue
    cells = [f"{p['tokens_per_s']:.1f}" for p in t["prefill"]] + \
            [f"{d['tokens_per_s']:.1f}" for d in t["decode"]]
    print(f"| transformers bf16, experts {t['impl']} | " + " | ".join(cells) + " |")
if ok:
    for s in results["switchyard"]:
        cells = []
        for i in range(len(prefills)):
            cells.append(f"{s['prefill'][i]['tokens_per_s'] / max(t['prefill'][i]['tokens_per_s'] for t in ok):.2f}x")
        for i in range(len(batches)):
            cells.append(f"{s['decode'][i]['tokens_per_s'] / max(t['decode'][i]['tokens_per_s'] for t in ok):.2f}x")
        print(f"| Switchyard {s['precision']} / best transformers | " + " | ".join(cells) + " |")
if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
