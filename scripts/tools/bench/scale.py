#!/usr/bin/env python3
"""Scale benchmark (docs/performance.md, "Many replicas"): the per-request cost of admission and
routing at few and at many replicas, and the control loop's tick at many replicas.

For each replica count it starts `moonserve run` with the no-op deployment (noop.lua), waits until
status lists every replica RUNNING, reads the tick durations the controller keeps (status
"control_loop": last, recent max over the last 64 ticks, mean), runs wrk against it, and reads the
tick again (the ticks that ran under load). The controller's CPU time over the wrk run divided by
the requests served (us/req, from /proc/PID/stat) is the engine's per-request cost: parsing,
admission, the router, forwarding and relaying; at 1,000 replicas the requests also spread over
more replica connections. With AUTOSCALING=1 (the default) it also starts the
same deployment under autoscaling_config min_replicas = max_replicas = N, whose ticks also sample
every replica and poll their stats every 0.5 s, and reads its idle tick.

Environment: BIN (default build/moonserve), REPLICAS (default "8 1000"), DURATION (seconds of wrk,
default 10), WARMUP (default 3), CONNECTIONS (default 64), THREADS (default 2), AUTOSCALING (1|0).
Exits non-zero when a measurement fails (a server does not come up, wrk fails, a non-2xx answer).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, wrk

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.environ.get("BIN") or os.path.join(ROOT, "build", "moonserve")
REPLICAS = [int(x) for x in os.environ.get("REPLICAS", "8 1000").split()]
DURATION = int(os.environ.get("DURATION", "10"))
WARMUP = int(os.environ.get("WARMUP", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "64"))
THREADS = int(os.environ.get("THREADS", "2"))
AUTOSCALING = os.environ.get("AUTOSCALING", "1") == "1"
NOOP = os.path.join(ROOT, "scripts", "tools", "bench", "noop.lua")


def get_json(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, tmp, n, autoscaling):
        self.port, self.admin = free_port(), free_port()
        dep = "        max_ongoing_requests: 1000\n"
        if autoscaling:
            dep += ("        autoscaling_config:\n          min_replicas: %d\n"
                    "          max_replicas: %d\n" % (n, n))
        else:
            dep += "        num_replicas: %d\n" % n
        cfg = ("http_options:\n  host: 127.0.0.1\n  port: %d\nadmin:\n  host: 127.0.0.1\n"
               "  port: %d\napplications:\n  - name: noop\n    route_prefix: /\n"
               "    import_path: noop.lua:app\n    deployments:\n      - name: Noop\n%s"
               % (self.port, self.admin, dep))
        path = os.path.join(tmp, "scale-%d-%d.yaml" % (n, autoscaling))
        with open(path, "w") as f:
            f.write(cfg)
        self.log = open(path + ".log", "wb")
        self.proc = subprocess.Popen([BIN, "run", path], cwd=tmp, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.n = n

    def status(self):
        return get_json("http://127.0.0.1:%d/api/serve/applications/" % self.admin)

    def wait_running(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("moonserve exited with %s" % self.proc.returncode)
            try:
                dep = self.status()["applications"]["noop"]["deployments"]["Noop"]
                if sum(r["state"] == "RUNNING" for r in dep["replicas"]) == self.n:
                    return
            except (OSError, KeyError, ValueError):
                pass
            # older builds list at most 256 replicas in status: their log still counts them
            with open(self.log.name, "rb") as f:
                if b"ready (%d of %d running)" % (self.n, self.n) in f.read():
                    return
            time.sleep(0.2)
        raise RuntimeError("%d replicas not RUNNING within %.0f s" % (self.n, timeout))

    def tick(self):
        """The control loop's figures after 64 more ticks (the recent window is 64 ticks)."""
        start = self.status().get("control_loop") or {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loop = self.status().get("control_loop") or {}
            if not loop or loop["ticks"] >= start["ticks"] + 64:
                return loop
            time.sleep(0.2)
        return loop

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def scrape_ms(admin, n=20):
    """Median wall time of GET /metrics on the admin listener, ms, and the text's size."""
    times, size = [], 0
    for _ in range(n):
        t0 = time.monotonic()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin, timeout=30) as r:
            size = len(r.read())
        times.append((time.monotonic() - t0) * 1e3)
    return sorted(times)[len(times) // 2], size


def cpu_s(pid):
    """utime + stime of a process, seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url, pid):
    """(requests/s, p50 ms, p99 ms, controller CPU microseconds per request)."""
    if WARMUP:
        wrk(url, THREADS, CONNECTIONS, WARMUP)
    cpu0 = cpu_s(pid)
    rps, p50, p99, requests = wrk(url, THREADS, CONNECTIONS, DURATION)
    return rps, p50, p99, (cpu_s(pid) - cpu0) * 1e6 / requests


def fmt_tick(loop):
    if not loop:
        return "n/a (no control_loop in status)"
    return "wall %.2f/%.2f ms, cpu %.2f/%.2f ms" % (
        loop["mean_tick_ms"], loop["recent_max_tick_ms"], loop["mean_tick_cpu_ms"],
        loop["recent_max_tick_cpu_ms"])


def main():
    rows = []
    with tempfile.TemporaryDirectory(prefix="moonserve-scale-") as tmp:
        with open(NOOP) as src, open(os.path.join(tmp, "noop.lua"), "w") as dst:
            dst.write(src.read())
        for n in REPLICAS:
            for autoscaling in ([0, 1] if AUTOSCALING else [0]):
                srv = Server(tmp, n, autoscaling)
                try:
                    t0 = time.monotonic()
                    srv.wait_running(60 + n * 0.2)
                    started = time.monotonic() - t0
                    idle = srv.tick()
                    row = {"n": n, "mode": "autoscaling" if autoscaling else "fixed",
                           "start_s": started, "idle": idle, "scrape": scrape_ms(srv.admin)}
                    if not autoscaling:
                        row["wrk"] = measure("http://127.0.0.1:%d/" % srv.port, srv.proc.pid)
                        row["load"] = srv.status().get("control_loop")
                    rows.append(row)
                    print("bench scale: %d replicas (%s) up in %.1f s; idle tick: %s"
                          % (n, row["mode"], started, fmt_tick(idle)), file=sys.stderr)
                finally:
                    t0 = time.monotonic()
                    srv.stop()
                    print("bench scale: stopped in %.1f s" % (time.monotonic() - t0),
                          file=sys.stderr)
    print("\nmoonserve scale bench: %s, %d CPUs, wrk %ds after %ds warm-up, %d connections, "
          "loadavg at end: %s" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  os.cpu_count(), DURATION, WARMUP, CONNECTIONS,
                                  open("/proc/loadavg").read().split(" ", 3)[:3]))
    print("ticks: mean over the run / max over the last 64 ticks, wall clock and the "
          "controller's CPU time")
    print("%-9s %-12s %8s  %-16s %-42s %s" % (
        "replicas", "mode", "start s", "/metrics ms, KB", "idle tick",
        "requests/s  p50 ms  p99 ms  us/req | tick under load"))
    for r in rows:
        load = ""
        if "wrk" in r:
            load = "%10.0f %7.3f %7.3f %6.1f | %s" % (r["wrk"] + (fmt_tick(r["load"]),))
        scrape = "%.2f, %.0f" % (r["scrape"][0], r["scrape"][1] / 1024.0)
        print("%-9d %-12s %8.1f  %-16s %-42s %s" % (r["n"], r["mode"], r["start_s"], scrape,
                                                    fmt_tick(r["idle"]), load))


if __name__ == "__main__":
    main()
