#!/usr/bin/env python3
"""A bounded load test of `switchyard serve`: N requests from C concurrent clients over
loopback, 1% of them malformed (bad JSON, wrong types, out-of-range values, invalid UTF-8, a
body over the limit), and the server's resident memory before and after.

    python3 bench/serve_load.py [--bin build/switchyard] [--checkpoint RUN] [--requests 10000]
                                [--clients 16] [--max-tokens 8]

Without --checkpoint it trains a tiny model first (a few steps; speed does not depend on the
weights). Every well-formed request must get 200 or 429 (then it is retried), every malformed
one a 4xx with a JSON error, and the server must still be running at the end.
"""
import argparse
import http.client
import json
import random
import re
import subprocess
import tempfile
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--bin", default="build/switchyard")
ap.add_argument("--checkpoint")
ap.add_argument("--requests", type=int, default=10000)
ap.add_argument("--clients", type=int, default=16)
ap.add_argument("--max-tokens", type=int, default=8)
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="sy_load_")
ck = args.checkpoint
if ck is None:
    ck = f"{work}/run"
    subprocess.run([args.bin, "train", "--steps", "3", "--threads", "1", "--out", ck, "--set",
                    "model.precision=f32"], check=True, stdout=subprocess.DEVNULL)
server = subprocess.Popen([args.bin, "serve", "--checkpoint", ck, "--port", "0", "--threads", "1",
                           "--max-batch", "32", "--max-waiting", "64", "--max-body", "65536"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = None
while port is None:
    m = re.search(r"on http://127\.0\.0\.1:(\d+)", server.stdout.readline())
    port = m and int(m.group(1))


def rss_kib():
    for line in open(f"/proc/{server.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def post(raw):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=raw, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


MALFORMED = [b"{\"prompt\": ", b"[1]", b"{\"prompt\": 3}", b"{\"prompt\": \"a\", \"max_tokens\": -1}",
             b"{\"prompt\": \"\xff\"}", b"{\"prompt\": \"a\", \"temperature\": \"hot\"}",
             b"{\"prompt\": \"" + b"a" * 70000 + b"\"}", b"{\"prompt\": \"a\", \"n\": 3}"]
lock = threading.Lock()
counts = {"ok": 0, "refused_then_ok": 0, "malformed_4xx": 0, "unexpected": 0}
tokens = 0
next_request = 0


def client(seed):
    global tokens, next_request
    rng = random.Random(seed)
    while True:
        with lock:
            if next_request >= args.requests:
                return
            i = next_request
            next_request += 1
        if rng.random() < 0.01:
            status, body = post(rng.choice(MALFORMED))
            ok = 400 <= status < 500 and "error" in json.loads(body)
            with lock:
                counts["malformed_4xx" if ok else "unexpected"] += 1
            continue
        raw = json.dumps({"prompt": f"Request {i}: ", "max_tokens": args.max_tokens,
                          "seed": i}).encode()
        refused = False
        while True:
            status, body = post(raw)
            if status != 429:
                break
            refused = True
            time.sleep(0.05)
        with lock:
            if status == 200:
                counts["refused_then_ok" if refused else "ok"] += 1
                tokens += json.loads(body)["usage"]["completion_tokens"]
            else:
                counts["unexpected"] += 1


warm = [threading.Thread(target=client, args=(1000 + c,)) for c in range(args.clients)]
total = args.requests
args.requests = min(200, total)  # warm-up: the first 200
for t in warm:
    t.start()
for t in warm:
    t.join()
rss_before = rss_kib()
args.requests = total
t0 = time.time()
threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
seconds = time.time() - t0
rss_after = rss_kib()
alive = server.poll() is None
server.terminate()
rc = server.wait(30)
print(f"{total} requests ({total - 200} timed) from {args.clients} clients in {seconds:.1f} s: "
      f"{counts}, {tokens} tokens; server RSS {rss_before / 1024:.1f} MiB after warm-up, "
      f"{rss_after / 1024:.1f} MiB at the end; alive at the end: {alive}; exit status after "
      f"SIGTERM: {rc}")
assert alive and rc == 0 and counts["unexpected"] == 0
