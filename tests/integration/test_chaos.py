"""Chaos under load, bounded in time (docs/reliability.md): CHAOS_S seconds per case (15 by
default; CHAOS_S=60 is the longer mode the issue asks for, one command:
`CHAOS_S=60 python3 tests/integration/test_chaos.py`).

- kill -9 of a random replica, again and again (each once the last one is replaced and 300
  more requests were answered), under load: every request gets an answer; the only
  failures are 502s of requests in flight on a killed replica, at most as many as were in
  flight (the load's concurrency) per kill; the engine replaces the replicas.
- a reload of every policy script after every 100 answers, under load: no request fails.
- rolling updates (the code moved to another file) back to back under load: no request fails.
- 1,500 idle connections and 200 slowloris ones held open: every other request is answered, and
  the controller's memory grows by less than 64 MiB.
"""

import os
import random
import resource
import signal
import socket
import sys
import time
import unittest

import harness
from harness import LoadGen, hello_app, rss_mib, wait_until

CHAOS_S = float(os.environ.get("CHAOS_S", "15"))
CONCURRENCY = 8
FAST_STOP = {"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 5}


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class ChaosTest(unittest.TestCase):

    def start(self, replicas=3):
        return harness.start_server(self, [hello_app("c", "/c", dict(num_replicas=replicas,
                                                                     **FAST_STOP))],
                                    extra_config={"control_loop": {"interval_s": 0.05}})

    def wait_replicas(self, srv, n):
        srv.wait_status("c", "Hello", lambda d: len(running(d)) == n, timeout=20,
                        what="%d running replicas" % n)

    def test_random_replica_kills_under_load(self):
        srv = self.start(3)
        self.wait_replicas(srv, 3)
        rng = random.Random(7)
        kills = 0
        with LoadGen(srv, "/c/x?sleep=0.005&w={i}", CONCURRENCY, timeout=10) as load:
            end = time.monotonic() + CHAOS_S
            while time.monotonic() < end:
                pids = [r["pid"] for r in running(srv.deployment_status("c", "Hello"))]
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
                # the next kill once the replica is replaced and the load moved on (paced by
                # events: the replacement, then 300 more answers)
                wait_until(lambda: len(running(srv.deployment_status("c", "Hello"))) == 3, 10)
                seen = load.count
                wait_until(lambda: load.count >= seen + 300, 10)
        print("chaos: %.0f s, %d kills, %d requests, %d failed (502)"
              % (CHAOS_S, kills, load.count, len(load.failures)), file=sys.stderr)
        self.assertGreater(kills, 0)
        self.assertGreater(load.count, 0)
        other = [f for f in load.failures if getattr(f, "status", None) != 502]
        self.assertEqual(other, [], "failures other than 502 (in flight on a killed replica)")
        self.assertLessEqual(len(load.failures), kills * CONCURRENCY,
                             "more failures than requests in flight at the kills")
        self.wait_replicas(srv, 3)
        self.assertEqual(srv.get("/c/x").status, 200)

    def test_reloads_under_load(self):
        srv = self.start(2)
        self.wait_replicas(srv, 2)
        reloads = 0
        with LoadGen(srv, "/c/x?w={i}", CONCURRENCY) as load:
            end = time.monotonic() + CHAOS_S / 2
            while time.monotonic() < end:
                code, body = srv.reload()
                self.assertEqual(code, 200, body)
                reloads += 1
                seen = load.count  # the next reload after 100 more answers
                wait_until(lambda: load.count >= seen + 100, 10)
        print("chaos: %.0f s, %d reloads, %d requests, %d failed"
              % (CHAOS_S / 2, reloads, load.count, len(load.failures)), file=sys.stderr)
        self.assertGreater(reloads, 3)
        self.assertEqual(load.failures, [], "requests failed during reloads")
        self.assertGreater(load.count, 0)

    def test_rolling_updates_under_load(self):
        srv = self.start(2)
        self.wait_replicas(srv, 2)
        with open(os.path.join(srv.dir, "hello.lua")) as f:
            code = f.read()
        updates = 0
        with LoadGen(srv, "/c/x?sleep=0.01&w={i}", CONCURRENCY) as load:
            end = time.monotonic() + CHAOS_S
            while time.monotonic() < end:
                updates += 1
                name = "hello_v%d.lua" % updates
                srv.write_file(name, code)
                before = {r["pid"] for r in running(srv.deployment_status("c", "Hello"))}
                app = hello_app("c", "/c", dict(num_replicas=2, **FAST_STOP))
                app["import_path"] = name + ":app"
                cfg = {"http_options": srv.http_options,
                       "admin": {"host": srv.host, "port": srv.admin_port},
                       "control_loop": {"interval_s": 0.05}, "applications": [app]}
                r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
                self.assertEqual(r.status, 200, r)
                srv.wait_status("c", "Hello", lambda d: len(running(d)) == 2 and not (
                    {x["pid"] for x in running(d)} & before), timeout=20,
                    what="update %d rolled out" % updates)
        print("chaos: %.0f s, %d rolling updates, %d requests, %d failed"
              % (CHAOS_S, updates, load.count, len(load.failures)), file=sys.stderr)
        self.assertGreater(updates, 1)
        self.assertEqual(load.failures, [], "requests failed during rolling updates")
        self.assertGreater(load.count, 0)

    def test_idle_and_slow_connections_do_not_starve_others(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 4096)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        n_idle = min(1500, want - 400)
        srv = self.start(2)
        self.wait_replicas(srv, 2)
        self.assertEqual(srv.get("/c/x").status, 200)
        base = rss_mib(srv.pid)
        held = []
        try:
            for _ in range(n_idle):  # connected, never a byte
                held.append(socket.create_connection((srv.host, srv.port), timeout=30))
            slow = []
            for _ in range(200):  # a request head that never ends, a byte at a time
                s = socket.create_connection((srv.host, srv.port), timeout=30)
                s.sendall(b"GET /c/x HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            held.extend(slow)
            served = 0
            for _ in range(5):
                for s in slow:
                    try:
                        s.send(b"X")
                    except OSError:
                        pass  # cut by header_timeout_s: allowed
                for _ in range(40):
                    self.assertEqual(srv.get("/c/x", timeout=10).status, 200)
                    served += 1
            peak = rss_mib(srv.pid)
        finally:
            for s in held:
                s.close()
        print("chaos: %d idle + 200 slow connections held, %d other requests served, controller "
              "RSS %.1f -> %.1f MiB" % (n_idle, served, base, peak), file=sys.stderr)
        self.assertEqual(served, 200)
        self.assertLess(peak - base, 64, "held connections cost the controller too much memory")
        self.assertEqual(srv.get("/c/x").status, 200)


if __name__ == "__main__":
    harness.main()
