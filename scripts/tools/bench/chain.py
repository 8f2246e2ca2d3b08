#!/usr/bin/env python3
"""Composition benchmark (docs/performance.md, "Composition: per-hop overhead"): no-op chains of
1, 2, 5 and 10 Lua deployments, each link passing the request's body to the next as a value
through a handle (`self.nxt:remote(x):result()`), served by one engine.

For every chain length and connection count it runs wrk against the chain's route and prints
requests/s, p50 and p99, and the engine's CPU per request (controller and replicas together,
from /proc). The per-hop overhead is the extra p50 latency (at 1 connection) and the extra CPU
per request of each added deployment: (value(N) - value(1)) / (N - 1). Ray Serve's published
nightly figure for a 10-deployment ServeHandle chain is printed beside the 10-chain row (4
clients; ../shared/reference/ray-serve-semantics.md, "Pipelines and ensembles").

Environment: BIN (default build/moonserve), CHAINS ("1 2 5 10"), CONNECTIONS ("1 4 64"),
DURATION (5), WARMUP (1), THREADS (2). Exits non-zero only when a measurement fails.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, stop, wrk

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("BIN") or os.path.join(ROOT, "build", "moonserve")
CHAINS = [int(x) for x in os.environ.get("CHAINS", "1 2 5 10").split()]
CONNECTIONS = [int(x) for x in os.environ.get("CONNECTIONS", "1 4 64").split()]
DURATION = int(os.environ.get("DURATION", "5"))
WARMUP = int(os.environ.get("WARMUP", "1"))
THREADS = int(os.environ.get("THREADS", "2"))
# Ray Serve nightly, 10-deployment ServeHandle linear pipeline, 4 clients x 20 requests.
RAY_10_TPS, RAY_10_MEAN_MS = 21.58, 46.72

# One application per chain length: deployments C<N>_1 (the ingress) .. C<N>_<N>.
CHAIN_LUA = r'''
local serve = require "moonserve"
local function chain(n)
  local node
  for i = n, 1, -1 do
    local D = serve.deployment { name = "C" .. n .. "_" .. i, max_ongoing_requests = 1000 }
    function D:init(nxt) self.nxt = nxt end
    if i == 1 then
      function D:__call(req)
        return self.nxt and self.nxt:remote(req.body):result() or req.body
      end
    else
      function D:__call(x)
        if self.nxt then return self.nxt:remote(x):result() end
        return x
      end
    end
    node = node and D:bind(node) or D:bind()
  end
  return node
end
local apps = {}
for n in ("%s"):gmatch("%%d+") do apps["c" .. n] = chain(tonumber(n)) end
return apps
'''


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid):
    """pid and every descendant (the replicas)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def tree_cpu(pid):
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_s(p)
        except OSError:
            pass
    return total


def main():
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="moonserve-chain-") as tmp:
        with open(os.path.join(tmp, "chain.lua"), "w") as f:
            f.write(CHAIN_LUA % " ".join(str(n) for n in CHAINS))
        apps = "".join("  - name: c%d\n    route_prefix: /c%d\n    import_path: chain.lua:c%d\n"
                       % (n, n, n) for n in CHAINS)
        cfg = os.path.join(tmp, "chain.yaml")
        with open(cfg, "w") as f:
            f.write("http_options:\n  host: 127.0.0.1\n  port: %d\nadmin:\n  host: 127.0.0.1\n"
                    "  port: %d\napplications:\n%s" % (port, admin, apps))
        log = open(cfg + ".log", "wb")
        proc = subprocess.Popen([BIN, "run", cfg], cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        rows = []
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError("moonserve exited with %s" % proc.returncode)
                try:
                    with urllib.request.urlopen("http://127.0.0.1:%d/c%d/" % (port, CHAINS[-1]),
                                                data=b"x", timeout=5) as r:
                        if r.status == 200 and r.read() == b"x":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the chains did not answer within 120 s")
                time.sleep(0.2)
            for n in CHAINS:
                url = "http://127.0.0.1:%d/c%d/" % (port, n)
                for c in CONNECTIONS:
                    if WARMUP:
                        wrk(url, min(THREADS, c), c, WARMUP)
                    cpu0 = tree_cpu(proc.pid)
                    rps, p50, p99, requests = wrk(url, min(THREADS, c), c, DURATION)
                    us = (tree_cpu(proc.pid) - cpu0) * 1e6 / requests
                    rows.append((n, c, rps, p50, p99, us))
                    print("bench chain: %d deployments, %d connections: %.0f req/s"
                          % (n, c, rps), file=sys.stderr)
        finally:
            stop(proc, 60)
            log.close()
    print("\nmoonserve chain bench: %s, %d CPUs, wrk %ds after %ds warm-up, loadavg at end: %s"
          % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.cpu_count(), DURATION,
             WARMUP, open("/proc/loadavg").read().split(" ", 3)[:3]))
    print("%-12s %-6s %10s %8s %8s %12s" % ("deployments", "conns", "requests/s", "p50 ms",
                                            "p99 ms", "CPU us/req"))
    for n, c, rps, p50, p99, us in rows:
        ray = ""
        if n == 10 and c == 4:
            ray = "   Ray nightly 10-chain, 4 clients: %.2f req/s, mean %.2f ms" % (
                RAY_10_TPS, RAY_10_MEAN_MS)
        print("%-12d %-6d %10.0f %8.3f %8.3f %12.1f%s" % (n, c, rps, p50, p99, us, ray))
    base = {(n, c): (p50, us) for n, c, _, p50, _, us in rows}
    print("\nper added deployment (against the 1-deployment chain):")
    for n in CHAINS:
        if n == 1 or (1, CONNECTIONS[0]) not in base:
            continue
        for c in CONNECTIONS:
            p50_1, us_1 = base[(1, c)]
            p50_n, us_n = base[(n, c)]
            print("  %2d deployments, %2d conns: +%.3f ms p50, +%.1f CPU us per hop"
                  % (n, c, (p50_n - p50_1) / (n - 1), (us_n - us_1) / (n - 1)))


if __name__ == "__main__":
    main()
