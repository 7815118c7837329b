#!/usr/bin/env python3
"""`switchyard serve` over loopback on an ephemeral port, driven with the standard library only.

    server_test.py SWITCHYARD WORKDIR

Trains a tiny byte-level model (a few steps), serves it, and checks: health, models, a
completion against `switchyard generate` with the same seed, streaming (server-sent events)
against the same request unstreamed, concurrent requests against each sent alone, every kind
of bad request (a JSON error naming the field or limit), a flood beyond the queue (429 with
Retry-After, the rest answered), a client vanishing mid-stream (cancelled, the server goes on),
the Prometheus metrics, and SIGTERM with a stream in flight (its last event, [DONE], exit 0).
Prints PASS at the end; any failure raises.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

BIN, WORK = sys.argv[1], sys.argv[2]
PRECISION = os.environ.get("SY_SERVE_PRECISION", "f32")
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
CONTEXT = 256
SMALL = ["--set", "model.d_model=32", "--set", f"model.context={CONTEXT}", "--set",
         "model.moe.d_ff=48", "--set", "model.n_layers=2", "--set", "train.batch=4", "--set",
         "train.eval_interval=1000", "--set", "train.checkpoint_interval=1000",
         "--set", f"model.precision={PRECISION}"]
subprocess.run([BIN, "train", "--steps", "3", "--threads", "1", "--out", f"{WORK}/run"] + SMALL,
               check=True, stdout=subprocess.DEVNULL, timeout=300)


def start(*extra):
    proc = subprocess.Popen([BIN, "serve", "--checkpoint", f"{WORK}/run", "--port", "0",
                             "--threads", "1", "--name", "tiny"] + list(extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"serve exited {proc.returncode}: {proc.stderr.read()}")
    raise SystemExit("serve did not say where it listens")


def request(port, method, path, body=None, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), payload


def complete(port, **fields):
    status, _, payload = request(port, "POST", "/v1/completions", {"model": "tiny", **fields})
    assert status == 200, (status, payload)
    return json.loads(payload)


def stream(port, **fields):
    """The events of a streamed completion: (texts, finish_reason, saw_done)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"stream": True, **fields}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.status
    assert r.getheader("Content-Type").startswith("text/event-stream")
    texts, finish, done, experts = [], None, False, []
    for raw in r.read().decode().split("\n\n"):
        if not raw.startswith("data: "):
            continue
        data = raw[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        choice = event["choices"][0]
        texts.append(choice["text"])
        finish = choice["finish_reason"] or finish
        if "switchyard" in event:
            experts += event["switchyard"]["experts"]
    conn.close()
    return texts, finish, done, experts


def expect_error(port, status, needle, param=None, body=None, raw=None, path="/v1/completions"):
    got, headers, payload = request(port, "POST" if path == "/v1/completions" else "GET", path,
                                    body=body, raw=raw)
    assert got == status, (status, got, payload)
    err = json.loads(payload)["error"]
    assert needle in err["message"], (needle, err)
    if param is not None:
        assert err["param"] == param, (param, err)
    return headers


proc, port = start("--max-batch", "4", "--max-waiting", "4", "--max-body", "65536")
try:
    status, _, payload = request(port, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"
    status, _, payload = request(port, "GET", "/v1/models")
    assert json.loads(payload)["data"][0]["id"] == "tiny"

    # A completion equals `switchyard generate` with the same seed and sampling.
    prompt = "It is a truth"
    c = complete(port, prompt=prompt, max_tokens=20, temperature=0.8, top_p=1, seed=7)
    assert c["object"] == "text_completion" and c["choices"][0]["finish_reason"] == "length"
    assert c["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 20,
                          "total_tokens": len(prompt) + 20}, c["usage"]
    gen = subprocess.run([BIN, "generate", "--checkpoint", f"{WORK}/run", "--prompt", prompt,
                          "--tokens", "20", "--temperature", "0.8", "--top-p", "1", "--seed", "7"],
                         capture_output=True, check=True, timeout=60).stdout
    assert gen.startswith(prompt.encode())
    want = gen[len(prompt):].decode("utf-8", errors="replace")
    assert c["choices"][0]["text"] == want, (c["choices"][0]["text"], want)
    print("completion equals generate with the same seed")

    # Streamed: the same text, piece by piece, then the finish reason and [DONE].
    texts, finish, done, experts = stream(port, prompt=prompt, max_tokens=20, temperature=0.8,
                                          top_p=1, seed=7, switchyard_experts=True)
    assert "".join(texts) == want and finish == "length" and done, (texts, finish, done)
    assert len(experts) == 20 and all(len(e) == 2 for e in experts), experts
    print(f"stream: {len(texts)} events, same text")

    # Concurrent requests (more than the batch, within the queue) each equal their answer alone.
    reqs = [dict(prompt=f"Chapter {i}. ", max_tokens=12 + i, temperature=0.9, seed=100 + i)
            for i in range(8)]
    alone = [complete(port, **r)["choices"][0]["text"] for r in reqs]
    together = [None] * len(reqs)

    def worker(i):
        together[i] = complete(port, **reqs[i])["choices"][0]["text"]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone, (together, alone)
    print("8 concurrent requests equal each sent alone")

    # Bad requests: each a JSON error naming the field or the limit; the server goes on.
    expect_error(port, 400, "not JSON", raw=b"{\"prompt\": ")
    expect_error(port, 400, "body: expected a JSON object", raw=b"[1, 2]")
    expect_error(port, 400, "max_tokens: expected an integer", "max_tokens",
                 {"prompt": "a", "max_tokens": "ten"})
    expect_error(port, 400, "max_tokens: -3", "max_tokens", {"prompt": "a", "max_tokens": -3})
    expect_error(port, 400, "max_tokens", "max_tokens", {"prompt": "a", "max_tokens": 10 ** 12})
    expect_error(port, 400, "max_tokens", "max_tokens", {"prompt": "a", "max_tokens": 2 ** 70})
    expect_error(port, 400, f"over the model's context of {CONTEXT}", "prompt",
                 {"prompt": "x" * (CONTEXT + 1)})
    expect_error(port, 400, "prompt: required", "prompt", {"max_tokens": 3})
    expect_error(port, 400, "prompt: expected a string", "prompt", {"prompt": 42})
    expect_error(port, 400, "prompt: empty", "prompt", {"prompt": ""})
    expect_error(port, 400, "not JSON", raw=b"{\"prompt\": \"\xff\xfe\"}")  # invalid UTF-8
    expect_error(port, 400, "temperature", "temperature", {"prompt": "a", "temperature": 5})
    expect_error(port, 400, "top_p", "top_p", {"prompt": "a", "top_p": 0})
    expect_error(port, 400, "stop: 5 strings", "stop", {"prompt": "a", "stop": list("abcde")})
    expect_error(port, 400, "stream: expected true or false", "stream",
                 {"prompt": "a", "stream": "yes"})
    expect_error(port, 400, "n: only 1", "n", {"prompt": "a", "n": 2})
    expect_error(port, 400, "logprobs", "logprobs", {"prompt": "a", "logprobs": 3})
    expect_error(port, 404, "is not served here", "model", {"prompt": "a", "model": "gpt-9"})
    expect_error(port, 413, "over the limit of 65536", raw=b"{\"prompt\": \"" + b"a" * 70000 + b"\"}")
    expect_error(port, 404, "no route GET /nowhere", path="/nowhere")
    ok = complete(port, prompt="a", max_tokens=2, user="someone", frequency_penalty=0)
    assert ok["usage"]["completion_tokens"] == 2  # unknown fields are ignored
    print("bad requests: named errors")

    # A slow client: sends half a request and stalls; others are served meanwhile.
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
    assert complete(port, prompt="b", max_tokens=3)["usage"]["completion_tokens"] == 3
    slow.close()

    # A client that vanishes mid-stream: its completion is cancelled, the server goes on.
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "Once", "max_tokens": CONTEXT - 8, "stream": True}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:  # the headers may come first, alone
        chunk = s.recv(4096)
        assert chunk, "the stream closed before its first event"
        got += chunk
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        metrics = request(port, "GET", "/metrics")[2].decode()
        m = re.search(r'switchyard_completions_total\{model="tiny",reason="(cancelled|length)"\} (\d+)', metrics)
        if re.search(r'reason="cancelled"\} [1-9]', metrics):
            break
        time.sleep(0.2)
    else:
        raise SystemExit("a vanished stream was not cancelled")
    print("vanished client: cancelled")

    # Metrics: counters that add up.
    metrics = request(port, "GET", "/metrics")[2].decode()
    tokens = int(re.search(r'switchyard_completion_tokens_total\{model="tiny"\} (\d+)', metrics).group(1))
    assert tokens >= 20 + 20 + 2 * sum(12 + i for i in range(8)), tokens
    routed = sum(int(v) for v in re.findall(r'switchyard_expert_tokens_total\{[^}]*\} (\d+)', metrics))
    assert routed > 0
    for name in ("switchyard_time_to_first_token_seconds_bucket", "switchyard_batch_sequences_count",
                 "switchyard_kv_cache_positions", "switchyard_sequences_waiting",
                 'switchyard_requests_total{model="tiny",status="400"}'):
        assert name in metrics, name
    print("metrics: consistent")
finally:
    if proc.poll() is None:
        proc.kill()
    proc.wait()

# A flood beyond the queue: 429 with Retry-After for some, every other one answered.
proc, port = start("--max-batch", "2", "--max-waiting", "2")
try:
    results = []
    lock = threading.Lock()

    def flood(i):
        status, headers, payload = request(port, "POST", "/v1/completions",
                                           {"prompt": f"{i}", "max_tokens": CONTEXT - 4})
        with lock:
            results.append((status, headers.get("Retry-After"), json.loads(payload)))
    threads = [threading.Thread(target=flood, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    codes = sorted(r[0] for r in results)
    assert len(results) == 24 and set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    for status, retry, body in results:
        if status == 429:
            assert retry == "1" and "retry later" in body["error"]["message"], (retry, body)
        else:
            assert body["usage"]["completion_tokens"] == CONTEXT - 4
    assert request(port, "GET", "/health")[0] == 200
    print(f"flood: {codes.count(200)} answered, {codes.count(429)} refused with 429")

    # SIGTERM with a stream in flight: the stream ends cleanly, the process exits 0.
    got = {}

    def long_stream():
        got["events"] = stream(port, prompt="Long", max_tokens=CONTEXT - 5)
    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t.join(30)
    rc = proc.wait(30)
    assert rc == 0, (rc, proc.stderr.read())
    texts, finish, done, _ = got["events"]
    assert done and finish in ("shutdown", "length"), (finish, done)
    print(f"SIGTERM: stream ended ({finish}), exit 0")
finally:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
print("PASS")
