#!/usr/bin/env python3
"""Async-task benchmark (docs/performance.md, "Async tasks"): one engine with a no-op task
consumer on a redis-server started here, beside redis-benchmark's figures for the same Redis,
in one run.

- redis-benchmark: XADD and HSET requests/s (50 clients), the two commands a submit costs.
- submit: wrk POSTs /-/tasks/bench at 1 and 64 connections for DURATION s while the consumers
  run the tasks: requests/s, p50, p99.
- end to end: tasks/s from the first submit to the last SUCCESS (the consumers' rate once the
  submits stop, and the whole run's).

Environment: BIN (default build/moonserve), DURATION (5), REPLICAS (2), THREADS (2).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, stop, wrk

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("BIN") or os.path.join(ROOT, "build", "moonserve")
DURATION = int(os.environ.get("DURATION", "5"))
REPLICAS = int(os.environ.get("REPLICAS", "2"))
THREADS = int(os.environ.get("THREADS", "2"))

APP_LUA = r'''
local serve = require "moonserve"
local Sink = serve.deployment { name = "Sink", max_ongoing_requests = 64 }
Sink.noop = serve.task_handler(function(self, x) return x end)
return { app = Sink:bind() }
'''

POST_LUA = '''wrk.method = "POST"
wrk.body = '{"name": "noop", "args": [1]}'
wrk.headers["Content-Type"] = "application/json"
'''


def redis_benchmark(port, *cmd):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-n", "200000", "-c", "50", "-q"]
                         + list(cmd), capture_output=True, text=True, check=True).stdout
    m = re.findall(r"([\d.]+) requests per second", out)
    return float(m[-1])


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def main():
    rport, port, admin = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="moonserve-tasks-bench-") as tmp:
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "",
                                  "--appendonly", "no", "--dir", tmp],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = None
        try:
            time.sleep(0.5)  # a benchmark, not a test: redis-benchmark retries its connect
            xadd = redis_benchmark(rport, "XADD", "bench-s", "*", "f", "v")
            hset = redis_benchmark(rport, "HSET", "bench-h", "f", "v")
            subprocess.run(["redis-cli", "-p", str(rport), "FLUSHALL"], check=True,
                           stdout=subprocess.DEVNULL)
            with open(os.path.join(tmp, "app.lua"), "w") as f:
                f.write(APP_LUA)
            with open(os.path.join(tmp, "post.lua"), "w") as f:
                f.write(POST_LUA)
            cfg = os.path.join(tmp, "c.yaml")
            with open(cfg, "w") as f:
                f.write("http_options:\n  host: 127.0.0.1\n  port: %d\nadmin:\n  host: 127.0.0.1\n"
                        "  port: %d\napplications:\n  - name: sink\n    route_prefix: null\n"
                        "    import_path: app.lua:app\n    deployments:\n      - name: Sink\n"
                        "        num_replicas: %d\n        task_queue:\n"
                        "          queue_name: bench\n          broker_url: redis://127.0.0.1:%d\n"
                        % (port, admin, REPLICAS, rport))
            log = open(cfg + ".log", "wb")
            proc = subprocess.Popen([BIN, "run", cfg], cwd=tmp, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            status = "http://127.0.0.1:%d/api/serve/applications/" % admin

            def queue():
                return get_json(status)["applications"]["sink"]["deployments"]["Sink"][
                    "task_queue"]
            deadline = time.monotonic() + 60
            while True:
                try:
                    if queue()["connected"]:
                        break
                except (OSError, KeyError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the engine's task queue never connected")
                time.sleep(0.2)
            url = "http://127.0.0.1:%d/-/tasks/bench" % port
            rows = []
            t_start = time.monotonic()
            for conns in (1, 64):
                rps, p50, p99, n = wrk(url, min(THREADS, conns), conns, DURATION,
                                       script=os.path.join(tmp, "post.lua"))
                rows.append((conns, rps, p50, p99, n))
            t_submitted = time.monotonic()
            submitted = queue()["submitted"]
            deadline = time.monotonic() + 600
            while queue()["succeeded"] < submitted:
                if time.monotonic() > deadline:
                    raise RuntimeError("tasks did not all finish: %r" % queue())
                time.sleep(0.1)
            t_done = time.monotonic()
            q = queue()
        finally:
            if proc:
                stop(proc, 30)
            redis.kill()
            redis.wait(10)
    print("redis-benchmark (50 clients): XADD %.0f/s, HSET %.0f/s" % (xadd, hset))
    print("%-22s %6s %12s %9s %9s" % ("submit", "conns", "requests/s", "p50 ms", "p99 ms"))
    for conns, rps, p50, p99, n in rows:
        print("%-22s %6d %12.0f %9.3f %9.3f" % ("POST /-/tasks/bench", conns, rps, p50, p99))
    whole = q["succeeded"] / (t_done - t_start)
    print("end to end: %d tasks, %.0f tasks/s over the run (%.1f s), the backlog drained %.1f s "
          "after the submits stopped; failed %d, redelivered %d"
          % (q["succeeded"], whole, t_done - t_start, t_done - t_submitted, q["failed"],
             q["redelivered"]))
    print("submit at 64 connections / redis-benchmark XADD: %.2f" % (rows[-1][1] / xadd))


if __name__ == "__main__":
    sys.exit(main())
