#!/usr/bin/env python3
"""Throughput and latency of OpenAI-compatible completion servers on the same model, driven by
the same Python clients: `switchyard serve` (continuous batching, with batching off, and on the exported Hugging Face
directory: `switchyard-hf`) and
`transformers serve --continuous-batching` on the model exported to Hugging Face format, with
its weights as exported (f32) and with --dtype bfloat16.

    bash scripts/bench_env.sh     # .venv-bench with torch and transformers[serving]
    python3 bench/serve_compare.py [--checkpoint RUN] [--clients 1 4 16 32] [--threads 1]

Without --checkpoint it trains austen-moe for 2 steps (speed does not depend on the weights)
and exports it with `switchyard export`. Each server runs its model on --threads threads
(OMP_NUM_THREADS for torch); each client streams --requests completions of --max-tokens tokens
(temperature 1, no end-of-text token, so every completion has exactly max_tokens tokens) one
after another. Servers send one or several tokens per event, so latency is measured per
request: TTFT from sending to the first text, ITL as (last text - first text) / (tokens - 1).
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="build/switchyard")
ap.add_argument("--checkpoint")
ap.add_argument("--python", default=".venv-bench/bin/python")
ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
ap.add_argument("--requests", type=int, default=4)
ap.add_argument("--max-tokens", type=int, default=64)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--servers", nargs="+",
                default=["switchyard", "switchyard-off", "transformers", "transformers-bf16",
                         "llama.cpp"])
ap.add_argument("--json")
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="sy_compare_")
ck = args.checkpoint
if ck is None:
    ck = f"{work}/run"
    subprocess.run([args.bin, "train", "--steps", "2", "--threads", "1", "--out", ck], check=True,
                   stdout=subprocess.DEVNULL)
hf = f"{work}/hf"
subprocess.run([args.bin, "export", "--checkpoint", ck, "--out", hf], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
PROMPT = "It is a truth universally acknow"  # 32 bytes, 32 tokens in either server


def start(kind):
    """Starts a server; returns (process, port, model name)."""
    if kind.startswith("switchyard"):
        # switchyard-hf: the exported Hugging Face directory through the DecoderModel path
        source = ["--model", hf] if kind == "switchyard-hf" else ["--checkpoint", ck]
        cmd = [args.bin, "serve", *source, "--port", "0", "--threads", str(args.threads),
               "--max-batch", "1" if kind == "switchyard-off" else "64"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        while True:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", p.stdout.readline())
            if m:
                return p, int(m.group(1)), None
    port = 18000 + os.getpid() % 1000
    if kind == "llama.cpp":
        # llama.cpp's own server with continuous batching: one slot per client at the most
        # clients, each slot the model's context (256); the GGUF converted from the export.
        bindir = subprocess.run(["bash", "bench/llama_cpp.sh", hf, f"{work}/model.gguf"], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
        slots = max(args.clients)
        cmd = [f"{bindir}/llama-server", "-m", f"{work}/model.gguf", "--host", "127.0.0.1",
               "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads), "-np",
               str(slots), "-c", str(256 * slots), "--cont-batching"]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return p, wait_ready(p, port, "/health"), None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [os.path.join(os.path.dirname(args.python), "transformers"), "serve", hf, "--continuous-batching",
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    if kind == "transformers-bf16":
        cmd += ["--dtype", "bfloat16"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return p, wait_ready(p, port, "/v1/models"), hf


def wait_ready(p, port, path):
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return port
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"server on port {port} did not start")


def one_request(port, model, seed, kind=""):
    """Streams one completion; returns (ttft, itl, tokens) or raises."""
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True}
    if model:
        body["model"] = model
    if kind == "llama.cpp":
        body["ignore_eos"] = True  # a byte model has no end-of-text token; never stop early
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:200]}")
    first = last = None
    done = False
    for raw in r:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            done = True
            break
        ev = json.loads(line[6:])
        choice = (ev.get("choices") or [{}])[0]
        if choice.get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
        # transformers ends with the finish reason and no [DONE]
        done = done or bool(choice.get("finish_reason"))
    c.close()
    if not done or first is None:
        raise RuntimeError("stream ended early")
    return first - t0, (last - first) / max(1, args.max_tokens - 1), args.max_tokens


def run(port, model, n, kind):
    ttft, itl, errors = [], [], []
    tokens = 0
    lock = threading.Lock()

    def client(c):
        nonlocal tokens
        for i in range(args.requests):
            try:
                a, b, t = one_request(port, model, 1000 * c + i, kind)
            except Exception as e:  # noqa: BLE001 (reported, not hidden)
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                ttft.append(a)
                itl.append(b)
                tokens += t

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    secs = time.perf_counter() - t0

    def pct(v, q):
        return statistics.quantiles(v, n=100, method="inclusive")[q - 1] if len(v) > 1 else v[0]

    return {"clients": n, "tokens_per_s": tokens / secs, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "errors": len(errors), "error": errors[:1]}


cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
           "?")
print(f"serve_compare: {ck}, {args.threads} model thread(s), {args.requests} requests x "
      f"{args.max_tokens} tokens per client, prompt 32 tokens; CPU {cpu}")
print(f"{'server':>16} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
      f"{'ITL p50':>8} {'ITL p99':>8}")
results = []
for kind in args.servers:
    proc, port, model = start(kind)
    try:
        one_request(port, model, 1, kind)  # warm-up (model load, kernel selection)
        for n in args.clients:
            if kind == "switchyard-off" and n not in (1, max(args.clients)):
                continue
            r = run(port, model, n, kind)
            r["server"] = kind
            results.append(r)
            print(f"{kind:>16} {n:>7} {r['tokens_per_s']:>9.1f} {1e3 * r['ttft_p50']:>7.1f}ms "
                  f"{1e3 * r['ttft_p99']:>7.1f}ms {1e3 * r['itl_p50']:>6.2f}ms "
                  f"{1e3 * r['itl_p99']:>6.2f}ms" + (f"  {r['errors']} failed: {r['error']}"
                                                     if r["errors"] else ""), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
if args.json:
    json.dump({"cpu": cpu, "results": results}, open(args.json, "w"), indent=1)
sys.exit(1 if any(r["errors"] for r in results) else 0)
