"""Replicas are processes: spreading over num_replicas, kill -9 under load (no hung request,
service recovers with a new process), client disconnect cancels."""

import os
import shutil
import signal
import threading
import time
import unittest

import harness
from harness import build_request, hello_app, proc_stat, run_threads, wait_until


class ReplicaSetTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 3, "max_ongoing_requests": 4})]

    def test_three_replica_processes(self):
        pids = self.server.wait_replicas(3, timeout=10)
        self.assertEqual(len(set(pids)), 3)
        for p in pids:
            # replicas are the same binary in replica mode
            exe = os.path.realpath("/proc/%d/exe" % p)
            self.assertEqual(exe, os.path.realpath(harness.BIN), "child %d is %s" % (p, exe))

    def test_responses_from_three_distinct_replicas(self):
        pids = set(self.server.wait_replicas(3, timeout=10))
        replicas, seen_pids = set(), set()
        # concurrent sleeping requests make the fewest-in-flight choice spread them out
        for _round in range(5):
            res = run_threads(lambda i: self.server.get("/hello/r%d?sleep=0.3" % i, timeout=10),
                              [(i,) for i in range(9)], timeout=15)
            for r, e in res:
                self.assertIsNone(e)
                self.assertEqual(r.status, 200, r)
                j = r.json()
                replicas.add(j["replica"])
                if j.get("pid"):
                    seen_pids.add(j["pid"])
            if len(replicas) >= 3:
                break
        self.assertEqual(len(replicas), 3, "replica ids seen: %r" % replicas)
        if seen_pids:
            self.assertEqual(seen_pids, pids, "pids reported by replicas vs server children")


class ReplicaCapTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 3, "max_ongoing_requests": 1,
                                                  "max_queued_requests": 6})]

    def test_cap_holds_across_replicas(self):
        self.server.wait_serving_replicas("/hello/warm", 3)
        t0 = time.monotonic()
        res = run_threads(lambda i: self.server.get("/hello/c%d?sleep=0.5" % i, timeout=20),
                          [(i,) for i in range(9)], timeout=25)
        total = time.monotonic() - t0
        self.assertEqual([r.status for r, e in res if r], [200] * 9, res)
        # 9 requests over 3 replicas x 1 slot: three rounds
        self.assertGreaterEqual(total, 1.4, "9 x 0.5 s over 3 single-slot replicas took %.2fs"
                                % total)
        self.assertEqual(len({r.json()["replica"] for r, _ in res}), 3)

    def test_overflow_gets_503_rest_served(self):
        self.server.wait_serving_replicas("/hello/warm", 3)
        res = run_threads(lambda i: self.server.get("/hello/o%d?sleep=0.5" % i, timeout=20),
                          [(i,) for i in range(16)], timeout=25)
        errs = [e for _, e in res if e]
        self.assertFalse(errs, errs)
        statuses = [r.status for r, _ in res]
        self.assertEqual(set(statuses) - {200, 503}, set(), statuses)
        # 3 running + 6 queued are served; the rest is refused
        self.assertGreaterEqual(statuses.count(200), 9, statuses)
        self.assertGreaterEqual(statuses.count(503), 1, statuses)
        for r, _ in res:
            if r.status == 503:
                self.assertErrorJSON(r, 503)


class KillReplicaTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 3, "max_ongoing_requests": 4})]

    def test_kill_9_under_load(self):
        srv = self.server
        srv.wait_serving_replicas("/hello/warm", 3)
        old = srv.wait_replicas(3, timeout=10)
        stop = threading.Event()
        results = []  # (status or exception repr, duration)
        error_responses = []
        lock = threading.Lock()

        def load(i):
            n = 0
            while not stop.is_set() and n < 100:
                n += 1
                t0 = time.monotonic()
                try:
                    r = srv.get("/hello/load%d?sleep=0.3" % i, timeout=8)
                    out = r.status
                    if r.status != 200:
                        with lock:
                            error_responses.append(r)
                except Exception as e:  # noqa: a timeout here is a hung request
                    out = repr(e)
                with lock:
                    results.append((out, time.monotonic() - t0))

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.8)
        victim = old[0]
        victim_st = proc_stat(victim)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(2.5)
        stop.set()
        for t in threads:
            t.join(12)
        self.assertFalse(any(t.is_alive() for t in threads), "load threads hung")

        # no hung request: everything finished (200, or 502/503 for those on the dead replica)
        bad = [x for x in results if x[0] not in (200, 502, 503)]
        self.assertFalse(bad, "requests failed or hung after kill -9: %r" % bad)
        slow = [x for x in results if x[1] > 5.0]
        self.assertFalse(slow, "requests took too long: %r" % slow)
        self.assertGreater(sum(1 for x in results if x[0] == 200), 10, results)
        errors = [x for x in results if x[0] != 200]
        for r in error_responses:  # 502/503 bodies are JSON errors carrying the request id
            self.assertErrorJSON(r, r.status)
        # at most the requests in flight on the dead replica (4) fail; queued ones are re-routed
        self.assertLessEqual(len(errors), 8, "too many failures after one replica died: %r"
                             % errors)

        # the dead process was reaped by the controller (no zombie left behind)
        def reaped():
            st = proc_stat(victim)
            return st is None or st[2] != victim_st[2]
        self.assertTrue(wait_until(reaped, 5),
                        "killed replica %d not reaped: %r" % (victim, proc_stat(victim)))

        # service fully back: 3 replicas again, with a new process in place of the dead one
        new = srv.wait_replicas(3, timeout=max(1.0, 10 - (time.monotonic() - killed_at)),
                                exclude=[victim])
        self.assertEqual(len(set(new) - set(old)), 1, "old %r new %r" % (old, new))
        replicas = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(replicas) < 3:
            res = run_threads(lambda i: srv.get("/hello/after%d?sleep=0.3" % i, timeout=10),
                              [(i,) for i in range(9)], timeout=15)
            for r, e in res:
                self.assertIsNone(e)
                self.assertEqual(r.status, 200, r)
                replicas.add(r.json()["replica"])
        self.assertEqual(len(replicas), 3, "after recovery, replicas serving: %r" % replicas)


FAILING_LUA = r'''
local serve = require "moonserve"
local Bad = serve.deployment { name = "Bad" }
function Bad:init() error("init exploded") end
function Bad:__call(req) return "never" end
return { app = Bad:bind() }
'''

CRASHING_LUA = r'''
local serve = require "moonserve"
local Crash = serve.deployment { name = "Crash" }
function Crash:__call(req)
  if req.path:find("die") then os.exit(3) end
  return { replica = serve.get_replica_context().replica_id }
end
return { app = Crash:bind() }
'''


class FailingReplicaTest(harness.ServerTestCase):
    FILES = {"bad.lua": FAILING_LUA, "crash.lua": CRASHING_LUA}
    APPLICATIONS = [
        {"name": "bad", "route_prefix": "/bad", "import_path": "bad.lua:app"},
        {"name": "crash", "route_prefix": "/crash", "import_path": "crash.lua:app",
         "deployments": [{"name": "Crash", "num_replicas": 1}]},
        hello_app("hello", "/hello", {"num_replicas": 1}),
    ]

    def test_failing_constructor_503_others_served(self):
        t0 = time.monotonic()
        r = self.server.get("/bad/x", timeout=15)
        dt = time.monotonic() - t0
        body = self.assertErrorJSON(r, 503)
        self.assertIn("init exploded", body.get("error", ""), body)
        self.assertLess(dt, 10)
        self.assertEqual(self.server.get("/hello/ok").status, 200)
        # the status document says why, as Ray Serve's DEPLOY_FAILED does
        app = self.server.status()["applications"]["bad"]
        self.assertEqual(app["status"], "DEPLOY_FAILED", app)
        dep = next(iter(app["deployments"].values()))
        self.assertEqual(dep["status_trigger"], "REPLICA_STARTUP_FAILED", dep)
        self.assertIn("init exploded", dep["message"], dep)
        # retries of the constructor do not pile up processes
        time.sleep(1.0)
        self.assertLessEqual(len(self.server.replica_pids()), 3, self.server.replica_pids())

    def test_replica_exit_in_handler(self):
        self.assertEqual(self.server.get("/crash/warm", timeout=10).status, 200)
        t0 = time.monotonic()
        r = self.server.get("/crash/die", headers={"X-Request-ID": "die-1"}, timeout=10)
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertIn(r.status, (502, 503), r)
        body = self.assertErrorJSON(r, r.status)
        self.assertEqual(body["request_id"], "die-1")

        def back():
            try:
                return self.server.get("/crash/again", timeout=3).status == 200
            except OSError:
                return False
        self.assertTrue(wait_until(back, 10, 0.2), "crash deployment did not recover")


CHAIN_LUA = r'''
local serve = require "moonserve"
local function self_pid()
  local f = io.open("/proc/self/stat", "r")
  local s = f:read("*l"); f:close()
  return tonumber(s:match("^(%d+)"))
end
local Model = serve.deployment { name = "Model", max_ongoing_requests = 1 }
function Model:__call(req)
  local a = req:json()
  if a.sleep then serve.sleep(a.sleep) end
  return { pid = self_pid() }
end
local Front = serve.deployment { name = "Front", max_ongoing_requests = 8 }
function Front:init(model) self.model = model end
function Front:__call(req)
  local out = self.model:remote({ sleep = tonumber(req.query.sleep) }):result()
  return { model_pid = out.pid }
end
return { app = Front:bind(Model:bind()) }
'''


class CompositionFailureTest(harness.ServerTestCase):
    FILES = {"chain.lua": CHAIN_LUA}
    APPLICATIONS = [{"name": "chain", "route_prefix": "/chain", "import_path": "chain.lua:app",
                     "deployments": [{"name": "Model", "num_replicas": 1},
                                     {"name": "Front", "num_replicas": 1}]}]

    def test_disconnect_cancels_downstream_call(self):
        self.assertEqual(self.server.get("/chain/warm").status, 200)
        s = self.server.connect()
        s.sendall(build_request("GET", "/chain/x?sleep=3"))
        time.sleep(0.4)
        s.close()
        # the Model's only slot is free again once the cancellation went downstream
        t0 = time.monotonic()
        r = self.server.get("/chain/next", timeout=10)
        dt = time.monotonic() - t0
        self.assertEqual(r.status, 200, r)
        self.assertLess(dt, 2.0, "downstream handle call not cancelled: next call waited %.2fs"
                        % dt)

    def test_downstream_replica_killed_during_call(self):
        model_pid = self.server.get("/chain/who").json()["model_pid"]
        self.assertIn(model_pid, self.server.replica_pids())
        out = {}

        def call():
            t0 = time.monotonic()
            try:
                out["r"] = self.server.get("/chain/x?sleep=3", headers={"X-Request-ID": "k1"},
                                           timeout=10)
            except Exception as e:  # noqa
                out["e"] = e
            out["dt"] = time.monotonic() - t0

        t = threading.Thread(target=call, daemon=True)
        t.start()
        time.sleep(0.5)
        os.kill(model_pid, signal.SIGKILL)
        t.join(10)
        self.assertIn("r", out, "caller hung or failed: %r" % out)
        self.assertLess(out["dt"], 2.5, "error from the dead downstream came late: %r" % out)
        self.assertIn(out["r"].status, (500, 502, 503), out["r"])
        self.assertErrorJSON(out["r"], out["r"].status)

        def back():
            try:
                r = self.server.get("/chain/again", timeout=3)
                return r.status == 200 and r.json()["model_pid"] != model_pid
            except OSError:
                return False
        self.assertTrue(wait_until(back, 10, 0.2), "chain did not recover with a new Model")


class ReplicaDeathCleanupTest(unittest.TestCase):

    def test_run_dir_removed_after_replica_was_killed(self):
        srv = harness.start_server(self, [hello_app("hello", "/hello", {"num_replicas": 2})])
        old = srv.wait_replicas(2)
        dirs = srv.run_dirs()
        self.assertTrue(dirs, "could not find the replicas' socket folder")
        for d in dirs:  # do not litter /tmp when the engine leaves it behind
            self.addCleanup(shutil.rmtree, d, True)
        os.kill(old[0], signal.SIGKILL)
        srv.wait_replicas(2, timeout=10, exclude=[old[0]])
        self.assertEqual(srv.get("/hello/x").status, 200)
        srv.stop()
        left = {d: sorted(os.listdir(d)) for d in dirs if os.path.exists(d)}
        self.assertEqual(left, {}, "run folder left behind after a clean exit")


class IdleReplicaDeathTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 3})]

    def test_requests_after_idle_replica_died_succeed(self):
        srv = self.server
        srv.wait_serving_replicas("/hello/warm", 3)
        pids = srv.wait_replicas(3)
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.2)  # the death is known by now; nothing was in flight on it
        statuses = []
        for i in range(30):
            statuses.append(srv.get("/hello/after%d" % i, timeout=5).status)
        self.assertEqual(statuses, [200] * 30, "requests failed after an idle replica died")
        res = run_threads(lambda i: srv.get("/hello/par%d?sleep=0.1" % i, timeout=5).status,
                          [(i,) for i in range(12)], timeout=10)
        self.assertEqual([r for r, _ in res], [200] * 12, res)
        srv.wait_replicas(3, timeout=10, exclude=[pids[1]])


class DisconnectTest(harness.ServerTestCase):
    APPLICATIONS = [
        hello_app("one", "/one", {"num_replicas": 1, "max_ongoing_requests": 1}),
        hello_app("other", "/other", {"num_replicas": 1}),
    ]

    def abandon(self, path, after=0.2):
        s = self.server.connect()
        s.sendall(build_request("GET", path))
        time.sleep(after)
        s.close()

    def test_disconnect_others_still_served(self):
        self.assertEqual(self.server.get("/other/warm").status, 200)
        for i in range(3):
            self.abandon("/other/gone%d?sleep=2" % i, after=0.1)
        t0 = time.monotonic()
        r = self.server.get("/other/x", timeout=5)
        self.assertEqual(r.status, 200, r)
        self.assertLess(time.monotonic() - t0, 1.5)

    def test_disconnect_frees_replica_slot(self):
        # one replica, one slot: while the abandoned 3 s request ran on, the next would wait
        self.assertEqual(self.server.get("/one/warm").status, 200)
        self.abandon("/one/gone?sleep=3", after=0.3)
        t0 = time.monotonic()
        r = self.server.get("/one/next", timeout=10)
        dt = time.monotonic() - t0
        self.assertEqual(r.status, 200, r)
        self.assertLess(dt, 2.0, "next request waited %.2fs: the disconnected client's request "
                                 "was not cancelled" % dt)

    def test_disconnect_mid_stream_frees_slot(self):
        self.assertEqual(self.server.get("/one/warm").status, 200)
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/one/stream?n=20&gap=0.2"))  # 4 s stream
            got = b""
            deadline = time.monotonic() + 3
            while b"part-1;" not in got and time.monotonic() < deadline:
                got += s.recv(4096)
            self.assertIn(b"part-1;", got)
        finally:
            s.close()
        t0 = time.monotonic()
        r = self.server.get("/one/next", timeout=10)
        dt = time.monotonic() - t0
        self.assertEqual(r.status, 200, r)
        self.assertLess(dt, 2.0, "next request waited %.2fs: the abandoned stream kept the "
                                 "replica's only slot" % dt)

    def test_disconnect_while_queued(self):
        # a queued request whose client left must not take the slot when it frees up
        self.assertEqual(self.server.get("/one/warm").status, 200)
        holder = threading.Thread(target=lambda: self.server.get("/one/hold?sleep=1", timeout=10),
                                  daemon=True)
        holder.start()
        time.sleep(0.2)
        self.abandon("/one/queued?sleep=3", after=0.2)  # queued behind holder, then gone
        t0 = time.monotonic()
        r = self.server.get("/one/next", timeout=10)
        dt = time.monotonic() - t0
        holder.join(10)
        self.assertEqual(r.status, 200, r)
        self.assertLess(dt, 2.5, "next request waited %.2fs behind an abandoned one" % dt)


if __name__ == "__main__":
    harness.main()
