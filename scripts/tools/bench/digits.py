#!/usr/bin/env python3
"""Model-serving benchmark (docs/performance.md, "Serving a model: digits"): the digits classifier
of examples/digits served four ways on the same box, one after another, each under wrk at 1, 8,
64 and 256 connections posting one held-out image per request:

  moonserve-unbatched  one replica; each request runs its own forward pass (model:predict({x}))
  moonserve-batched    one replica; requests share forward passes through serve.batch
                       (max_batch_size 64, batch_wait_timeout_s 0.002)
  moonserve-adaptive   the same with latency_target_s (TARGET_MS, default 20): the engine picks
                       the wait from the measured execution time
  python-uvicorn       the same forward pass in numpy behind uvicorn (one worker, plain ASGI):
                       the reference a Python serving stack gives

It prints requests/s, p50 and p99 per system and connection count, and the ratios batched /
unbatched and moonserve / python at 64 connections. Every answer is checked to be the expected
label first. Exits non-zero only when a measurement fails.

MODEL=wide serves, instead of the trained 64-32-10 MLP, a wide one of the same input and output
(64-2048-2048-10, random weights written by this script): a model whose forward pass, not the
request, dominates the cost, as a real model's does. Every system must then give the same label.

Environment: BIN (default build/moonserve), MODEL (digits|wide), DURATION (5), WARMUP (1),
CONNECTIONS ("1 8 64 256"),
THREADS (2), TARGET_MS (20), SYSTEMS (all four, space separated), PYTHON (the interpreter with
Debian's python3-uvicorn and python3-numpy: /usr/bin/python3 when present).
"""

import array
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, stop, wrk

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("BIN") or os.path.join(ROOT, "build", "moonserve")
DIGITS = os.path.join(ROOT, "examples", "digits")
DURATION = int(os.environ.get("DURATION", "5"))
WARMUP = int(os.environ.get("WARMUP", "1"))
CONNECTIONS = [int(x) for x in os.environ.get("CONNECTIONS", "1 8 64 256").split()]
THREADS = int(os.environ.get("THREADS", "2"))
TARGET_MS = float(os.environ.get("TARGET_MS", "20"))
MODEL = os.environ.get("MODEL", "digits")
PYTHON = os.environ.get("PYTHON") or ("/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                                      else sys.executable)
SYSTEMS = os.environ.get("SYSTEMS", "moonserve-unbatched moonserve-batched moonserve-adaptive "
                         "python-uvicorn").split()

APP_LUA = r'''
local serve = require "moonserve"
local function digits(name, batch_opts)
    local D = serve.deployment { name = name, max_ongoing_requests = 512 }
    function D:init(weights) self.model = serve.nn.load(weights) end
    local function predict(self, rows) return self.model:predict(rows) end
    if batch_opts then
        D.predict = serve.batch(batch_opts, predict)
    else
        function D:predict(row) return predict(self, { row })[1] end
    end
    function D:__call(req) return { label = self:predict(req:json().pixels) } end
    return D
end
local W = "%(weights)s"
return {
    unbatched = digits("Unbatched"):bind(W),
    batched = digits("Batched", { max_batch_size = 64, batch_wait_timeout_s = 0.002 }):bind(W),
    adaptive = digits("Adaptive", { max_batch_size = 64, batch_wait_timeout_s = 0.002,
                                    latency_target_s = %(target)g }):bind(W),
}
'''

# A plain ASGI app: the same forward pass in numpy (ReLU between layers, softmax at the end).
ASGI_PY = r'''
import json, struct
import numpy as np

def load(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    layers = []
    i = 0
    while "layers.%%d.weight" %% i in header:
        t = {}
        for part in ("weight", "bias"):
            h = header["layers.%%d.%%s" %% (i, part)]
            a, b = h["data_offsets"]
            t[part] = np.frombuffer(data[a:b], dtype="<f4").reshape(h["shape"])
        layers.append((t["weight"].T.copy(), t["bias"]))
        i += 1
    return layers

LAYERS = load("%(weights)s")

def predict(x):
    for k, (w, b) in enumerate(LAYERS):
        x = x @ w + b
        if k < len(LAYERS) - 1:
            x = np.maximum(x, 0)
    e = np.exp(x - x.max())
    return int(np.argmax(e / e.sum()))

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    x = np.asarray(json.loads(body)["pixels"], dtype=np.float32)
    out = json.dumps({"label": predict(x)}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
'''

WRK_POST = r'''
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
'''


def post(url, body, timeout=5):
    req = urllib.request.Request(url, data=body.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_answer(url, body, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            return post(url, body)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("no answer from %s within %d s" % (url, timeout))


def write_wide(path, widths=(64, 2048, 2048, 10), seed=1):
    """A safetensors file of random layers (docs/nn.md's layer convention), scaled so the
    activations stay in range."""
    rnd = random.Random(seed)
    header, blobs, offset = {}, [], 0
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        scale = (2.0 / n_in) ** 0.5
        for name, count, shape in (("weight", n_in * n_out, [n_out, n_in]),
                                   ("bias", n_out, [n_out])):
            a = array.array("f", (rnd.gauss(0, scale) for _ in range(count)))
            blob = a.tobytes()
            header["layers.%d.%s" % (i, name)] = {"dtype": "F32", "shape": shape,
                                                   "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def start(system, tmp, port, weights):
    if system == "python-uvicorn":
        with open(os.path.join(tmp, "digits_asgi.py"), "w") as f:
            f.write(ASGI_PY % {"weights": weights})
        cmd = [PYTHON, "-m", "uvicorn", "--no-access-log", "--log-level", "warning",
               "--host", "127.0.0.1", "--port", str(port), "digits_asgi:app"]
    else:
        attr = system.split("-", 1)[1]
        with open(os.path.join(tmp, "bench_digits.lua"), "w") as f:
            f.write(APP_LUA % {"weights": weights, "target": TARGET_MS / 1000})
        cfg = os.path.join(tmp, system + ".yaml")
        with open(cfg, "w") as f:
            f.write("http_options: {host: 127.0.0.1, port: %d}\nadmin: {host: 127.0.0.1, "
                    "port: %d}\napplications:\n  - name: digits\n    route_prefix: /\n"
                    "    import_path: bench_digits.lua:%s\n" % (port, free_port(), attr))
        cmd = [BIN, "run", cfg]
    log = open(os.path.join(tmp, system + ".log"), "wb")
    return subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL), log


def measure(url, script, conns):
    rps, p50, p99, _ = wrk(url, min(THREADS, conns), conns, DURATION, WARMUP, script)
    return rps, p50, p99


def main():
    # The Python reference's packages, as bench.sh installs nginx for its own.
    subprocess.run([os.path.join(ROOT, "scripts", "tools", "bootstrap.sh"), "python3-uvicorn",
                    "python3-numpy"], check=True)
    with open(os.path.join(DIGITS, "test.json")) as f:
        sample = json.load(f)[0]
    body = json.dumps({"pixels": sample["pixels"]})
    results = {}
    expected = sample["label"] if MODEL == "digits" else None
    with tempfile.TemporaryDirectory(prefix="moonserve-digits-") as tmp:
        weights = os.path.join(DIGITS, "weights.safetensors")
        if MODEL == "wide":
            weights = os.path.join(tmp, "wide.safetensors")
            write_wide(weights)
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_POST % body)
        for system in SYSTEMS:
            port = free_port()
            proc, log = start(system, tmp, port, weights)
            url = "http://127.0.0.1:%d/" % port
            try:
                got = wait_answer(url, body, proc)
                if expected is None:
                    expected = got.get("label")
                if got.get("label") != expected:
                    raise RuntimeError("%s answered %r, expected label %r" % (system, got, expected))
                for c in CONNECTIONS:
                    results[(system, c)] = measure(url, script, c)
                    print("bench digits: %s c=%d: %.0f req/s p50 %.2f ms p99 %.2f ms"
                          % ((system, c) + results[(system, c)]), file=sys.stderr)
            finally:
                stop(proc, 30)
                log.close()
    print("\nmoonserve digits bench (model %s): %s, %d CPUs, %ds per run after %ds warm-up, "
          "adaptive target %g ms, loadavg at end: %s" % (
              MODEL, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.cpu_count(),
              DURATION, WARMUP, TARGET_MS, " ".join(open("/proc/loadavg").read().split()[:3])))
    print("%-22s %5s %12s %9s %9s" % ("system", "conns", "requests/s", "p50 ms", "p99 ms"))
    for system in SYSTEMS:
        for c in CONNECTIONS:
            rps, p50, p99 = results[(system, c)]
            print("%-22s %5d %12.0f %9.2f %9.2f" % (system, c, rps, p50, p99))

    def ratio(a, b, c=64):
        if (a, c) in results and (b, c) in results:
            print("ratio %s / %s at %d connections (throughput): %.2fx"
                  % (a, b, c, results[(a, c)][0] / results[(b, c)][0]))
    ratio("moonserve-batched", "moonserve-unbatched")
    ratio("moonserve-adaptive", "moonserve-batched")
    ratio("moonserve-batched", "python-uvicorn")
    ratio("moonserve-unbatched", "python-uvicorn")


if __name__ == "__main__":
    main()
