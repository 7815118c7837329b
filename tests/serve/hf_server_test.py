#!/usr/bin/env python3
"""`switchyard serve --model DIR` on a Hugging Face fixture (made by transformers itself), over
loopback on an ephemeral port, standard library only.

    hf_server_test.py SWITCHYARD FIXTURE_DIR

Checks: the greedy completion of the fixture's prompt has transformers' greedy tokens (the
`switchyard_experts` extension reports them, with each token's experts), streaming gives the same
text as the unstreamed answer, /switchyard/info gives the model's shape, a prompt over the
context is a 400 naming it, and SIGTERM exits 0. Prints PASS at the end; any failure raises.
"""
import http.client
import json
import re
import signal
import subprocess
import sys
import time

BIN, DIR = sys.argv[1], sys.argv[2]
want = json.load(open(f"{DIR}/expected.json"))
config = json.load(open(f"{DIR}/config.json"))
proc = subprocess.Popen([BIN, "serve", "--model", DIR, "--port", "0", "--threads", "1",
                         "--precision", "f32", "--name", "fixture"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
port = None
deadline = time.time() + 60
while port is None and time.time() < deadline:
    m = re.search(r"on http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    port = m and int(m.group(1))
    if proc.poll() is not None:
        raise SystemExit(f"serve exited {proc.returncode}: {proc.stderr.read()}")
assert port, "serve did not say where it listens"


def post(body, stream=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


n = 12
status, payload = post({"prompt": want["prompt"], "max_tokens": n, "temperature": 0,
                        "stream": True, "switchyard_experts": True})
assert status == 200, (status, payload)
texts, tokens, experts, finish = [], [], [], None
for raw in payload.decode().split("\n\n"):
    if not raw.startswith("data: ") or raw == "data: [DONE]":
        continue
    event = json.loads(raw[len("data: "):])
    texts.append(event["choices"][0]["text"])
    finish = event["choices"][0]["finish_reason"] or finish
    if "switchyard" in event:
        tokens += event["switchyard"]["tokens"]
        experts += event["switchyard"]["experts"]
eos = config.get("eos_token_id")
eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
expect = []
for t in want["greedy"][:n]:
    expect.append(t)
    if t in eos:
        break
assert tokens == expect, (tokens, expect)
assert finish == ("stop" if expect[-1] in eos else "length"), finish
moe_layers = sum(1 for e in experts[0]) if experts else 0
assert len(experts) == len(tokens) and moe_layers > 0, experts
print(f"greedy tokens equal transformers' ({len(tokens)}), {moe_layers} MoE layers reported")

status, payload = post({"prompt": want["prompt"], "max_tokens": n, "temperature": 0})
assert status == 200, (status, payload)
answer = json.loads(payload)
assert answer["choices"][0]["text"] == "".join(texts), (answer, texts)
assert answer["usage"]["prompt_tokens"] == len(want["input_ids"]), answer["usage"]
print("stream equals the unstreamed text; usage counts the tokenizer's prompt tokens")

conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
conn.request("GET", "/switchyard/info")
info = json.loads(conn.getresponse().read())
assert info["moe_layers"] == moe_layers and info["vocab"] == config["vocab_size"], info
status, payload = post({"prompt": "a " * 4 * config["max_position_embeddings"], "max_tokens": 1})
assert status == 400 and b"over the model's context" in payload, (status, payload)
print("info and the context limit")

proc.send_signal(signal.SIGTERM)
assert proc.wait(30) == 0
print("PASS")
