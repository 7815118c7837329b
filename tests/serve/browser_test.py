#!/usr/bin/env python3
"""The page at GET / in a real browser: Debian's chromium, headless, driven over the DevTools
protocol (a minimal WebSocket client below; the standard library has none).

    browser_test.py SWITCHYARD WORKDIR [SCREENSHOT.png]

Trains a tiny model, serves it, opens the page with a prompt that runs by itself, waits for the
stream to finish, and checks that the generated tokens are on the page, each coloured by an
expert of the chosen layer, that the load bars are there, and that picking another layer
recolours the tokens by that layer's experts. Exits 77 (ctest: skipped) without chromium.
"""
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request

BIN, WORK = sys.argv[1], sys.argv[2]
SHOT = sys.argv[3] if len(sys.argv) > 3 else None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    print("SKIP: no chromium here (scripts/setup.sh installs it)")
    sys.exit(77)
shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
subprocess.run([BIN, "train", "--steps", "3", "--threads", "1", "--out", f"{WORK}/run",
                "--set", "model.d_model=32", "--set", "model.context=128", "--set",
                "model.moe.d_ff=48", "--set", "model.n_layers=2", "--set", "train.batch=4",
                "--set", "train.eval_interval=1000", "--set", "train.checkpoint_interval=1000",
                "--set", "model.precision=f32"],
               check=True, stdout=subprocess.DEVNULL, timeout=300)


class WebSocket:
    """Text frames over one connection (RFC 6455): masked from us, unmasked from the browser."""

    def __init__(self, url):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", url)
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {m.group(3)} HTTP/1.1\r\nHost: {m.group(1)}:{m.group(2)}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the browser closed the DevTools connection")
            data += chunk
        return data

    def send(self, text):
        payload, mask = text.encode(), os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            message += self._read(n)
            if b0 & 0x80:
                return message.decode()


class DevTools:
    def __init__(self, ws_url):
        self.ws, self.next_id = WebSocket(ws_url), 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return r["result"].get("value")


server = subprocess.Popen([BIN, "serve", "--checkpoint", f"{WORK}/run", "--port", "0",
                           "--threads", "1", "--name", "tiny"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
browser = None
try:
    port = None
    while port is None:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("serve exited")
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        port = m and int(m.group(1))
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                                "--remote-debugging-port=0", f"--user-data-dir={WORK}/profile",
                                "--window-size=1100,760", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    devtools_port = None
    deadline = time.time() + 60
    while devtools_port is None and time.time() < deadline:
        line = browser.stderr.readline()
        m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        devtools_port = m and int(m.group(1))
    assert devtools_port, "chromium did not open DevTools"
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list"))
    page = next(t for t in targets if t["type"] == "page")
    dt = DevTools(page["webSocketDebuggerUrl"])
    dt.call("Page.enable")
    dt.call("Page.navigate", url=f"http://127.0.0.1:{port}/?prompt=It%20is%20a%20truth"
                                 f"&max_tokens=40&autorun=1")
    done = None
    deadline = time.time() + 60
    while time.time() < deadline:
        done = dt.eval("document.body && document.body.dataset.done")
        if done:
            break
        time.sleep(0.2)
    assert done and done != "error", f"the page did not finish: {done!r}, status " + \
        str(dt.eval("document.getElementById('status').textContent"))
    state = dt.eval("""JSON.stringify({
        tokens: document.querySelectorAll('#out .tok').length,
        coloured: [...document.querySelectorAll('#out .tok')].filter(s => s.style.background).length,
        experts: [...new Set([...document.querySelectorAll('#out .tok')].map(s => s.dataset.expert))],
        layer0: [...document.querySelectorAll('#out .tok')].map(s => s.dataset.experts.split(',')[0]),
        bars: document.querySelectorAll('#bars div').length,
        layers: document.querySelectorAll('#layer option').length,
        status: document.getElementById('status').textContent})""")
    s = json.loads(state)
    print("page:", {k: v for k, v in s.items() if k != "layer0"})
    assert s["tokens"] == 40 and int(done) == 40, s
    assert s["coloured"] == 40, s
    assert all(0 <= int(e) < 8 for e in s["experts"]) and len(s["experts"]) >= 2, s
    assert s["bars"] == 8 and s["layers"] == 2, s
    assert s["status"].startswith("done: 40 tokens"), s
    # Another layer: every token recoloured by its expert there.
    layer1 = json.loads(dt.eval("""(() => {
        const sel = document.getElementById('layer');
        sel.value = '1';
        sel.dispatchEvent(new Event('change'));
        return JSON.stringify([...document.querySelectorAll('#out .tok')].map(
            s => [s.dataset.expert, s.dataset.experts.split(',')[1]]));
    })()"""))
    assert all(a == b for a, b in layer1), layer1
    assert [a for a, _ in layer1] != s["layer0"] or True  # the layers may agree by chance
    if SHOT:
        png = base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"])
        with open(SHOT + ".tmp", "wb") as f:
            f.write(png)
        os.replace(SHOT + ".tmp", SHOT)
        print(f"screenshot: {SHOT} ({len(png)} bytes)")
    print("PASS")
finally:
    if browser is not None:
        browser.kill()
        browser.wait()
    server.kill()
    server.wait()
