"""A thousand replicas of one deployment, and an application of a hundred deployments.

Status lists every replica RUNNING, requests are served, /metrics counts them all, a scale down
to 10 and back works, and the memory of an idle Lua replica is measured from /proc (PSS and RSS,
printed; docs/performance.md has the figure). The hundred-deployment application has an
application-level autoscaling policy that must reach every deployment, past the 64 the control
loop once handled.

Under the ASan+UBSan build every process is several times larger (about 5 MB PSS and 13 MB RSS
per idle replica, against 0.4 and 3.4) and slower to start, so the test runs 300 replicas and 66
deployments there: still past the old caps (256 replicas in status and metrics, 64 deployments per
application policy). The build is told apart by asking the binary itself: a sanitized one carries
the ASan runtime's symbols. MS_SCALE_REPLICAS and
MS_SCALE_DEPLOYMENTS override the counts.
"""

import os
import re
import resource
import subprocess
import time
import unittest

import harness
from harness import hello_app, run_threads, wait_until


def sanitized_binary(path):
    """True when the binary was built with AddressSanitizer."""
    with open(path, "rb") as f:
        return b"__asan_init" in f.read()


SANITIZED = sanitized_binary(harness.BIN)
N_REPLICAS = int(os.environ.get("MS_SCALE_REPLICAS") or (300 if SANITIZED else 1000))
N_DEPLOYMENTS = int(os.environ.get("MS_SCALE_DEPLOYMENTS") or (66 if SANITIZED else 100))
# Starting a replica is a process start and a LuaJIT state: about 25 ms of CPU each on the
# 2-core test machine, several times that under the sanitizers.
START_BOUND_S = 30.0 + N_REPLICAS * (0.3 if SANITIZED else 0.06)


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def memory_of(pid):
    """{"Rss": kB, "Pss": kB, ...} of a process from /proc/PID/smaps_rollup ({} if it is gone)."""
    out = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    out[parts[0][:-1]] = int(parts[1])
    except OSError:
        pass
    return out


def metric(text, name, app, deployment):
    m = re.search(r'^%s\{application="%s",deployment="%s"\} (\S+)$' % (name, app, deployment),
                  text, re.M)
    return float(m.group(1)) if m else None


class ScaleServerTestCase(unittest.TestCase):
    """A shared server started without the harness's 15 s health bound: starting hundreds of
    replica processes takes longer than that."""

    APPLICATIONS = FILES = EXTRA_CONFIG = None

    @classmethod
    def setUpClass(cls):
        cls.server = harness.Server(cls.APPLICATIONS, files=cls.FILES,
                                    extra_config=cls.EXTRA_CONFIG, shutdown_timeout_s=120.0)
        try:
            t0 = time.monotonic()
            cls.server.start(wait=False)
            cls.server.wait_healthy(timeout=START_BOUND_S)
            cls.started_s = time.monotonic() - t0
        except BaseException:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
        finally:
            cls.server.cleanup()

    def metrics(self):
        r = self.server.admin_request("GET", "/metrics", timeout=30)
        self.assertEqual(r.status, 200, r)
        return r.text


class ThousandReplicasTest(ScaleServerTestCase):
    APPLICATIONS = [dict(hello_app("wide", "/w", {"num_replicas": N_REPLICAS,
                                                   "max_ongoing_requests": 4}),
                         external_scaler_enabled=True)]

    def wait_running(self, n, timeout):
        return self.server.wait_status(
            "wide", "Hello", lambda d: len(running(d)) == n and len(d["replicas"]) == n,
            timeout=timeout, what="exactly %d replicas, all RUNNING" % n)

    def test_a_status_lists_every_replica_running(self):
        dep = self.wait_running(N_REPLICAS, START_BOUND_S)
        print("\n%d replicas RUNNING %.1f s after start" % (N_REPLICAS, self.started_s))
        ids = {r["replica_id"] for r in dep["replicas"]}
        self.assertEqual(len(ids), N_REPLICAS, "replica ids repeat")
        self.assertEqual(dep["status"], "HEALTHY", dep["message"])
        self.assertEqual(len(self.server.replica_pids()), N_REPLICAS)

    def test_b_metrics_count_every_replica(self):
        self.wait_running(N_REPLICAS, START_BOUND_S)
        text = self.metrics()
        self.assertEqual(metric(text, "moonserve_deployment_running_replicas", "wide", "Hello"),
                         N_REPLICAS, text[:2000])
        self.assertEqual(metric(text, "moonserve_deployment_target_replicas", "wide", "Hello"),
                         N_REPLICAS)

    def test_c_requests_served(self):
        self.wait_running(N_REPLICAS, START_BOUND_S)
        res = run_threads(lambda i: self.server.get("/w/n%d" % i, timeout=30),
                          [(i,) for i in range(400)], timeout=120)
        statuses = [r.status if r else repr(e) for r, e in res]
        self.assertEqual(statuses, [200] * 400)
        replicas = {r.json()["replica"] for r, _ in res}
        # the built-in router picks two replicas at random per request: 400 requests over 1000
        # replicas land on well over a hundred distinct ones
        self.assertGreater(len(replicas), min(N_REPLICAS, 400) // 4, replicas)

    def test_d_idle_replica_memory(self):
        self.wait_running(N_REPLICAS, START_BOUND_S)
        pids = self.server.replica_pids()
        mems = [m for m in (memory_of(p) for p in pids) if "Pss" in m]
        self.assertEqual(len(mems), len(pids))
        pss = sum(m["Pss"] for m in mems) / len(mems)
        rss = sum(m["Rss"] for m in mems) / len(mems)
        private = sum(m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) for m in mems) / len(mems)
        controller = memory_of(self.server.pid)
        print("\nidle Lua replica (%d, %s build): PSS %.0f kB, RSS %.0f kB, private %.0f kB; "
              "controller RSS %d kB" % (len(mems), "sanitizer" if SANITIZED else "release", pss,
                                        rss, private, controller.get("Rss", 0)))
        if not SANITIZED:
            # measured about 0.4 MB PSS and 3.4 MB RSS: a generous bound that still catches a
            # replica doubling its footprint
            self.assertLess(pss, 2048, "mean PSS of an idle replica, kB")

    def test_e_control_loop_tick_reported(self):
        self.wait_running(N_REPLICAS, START_BOUND_S)
        doc = self.server.status()
        loop = doc.get("control_loop") or {}
        ticks = loop.get("ticks", 0)
        self.assertTrue(wait_until(lambda: self.server.status()["control_loop"]["ticks"]
                                   > ticks + 5, 10), loop)
        loop = self.server.status()["control_loop"]
        print("\ncontrol loop at %d replicas: recent max %.3f ms wall, %.3f ms CPU"
              % (N_REPLICAS, loop["recent_max_tick_ms"], loop["recent_max_tick_cpu_ms"]))
        for clock in ("", "_cpu"):
            self.assertGreaterEqual(loop["max_tick%s_ms" % clock],
                                    loop["recent_max_tick%s_ms" % clock])
            self.assertGreater(loop["recent_max_tick%s_ms" % clock], 0)

    def test_z_scale_down_to_10_and_back(self):
        srv = self.server
        self.wait_running(N_REPLICAS, START_BOUND_S)
        r = srv.scale("wide", "Hello", 10)
        self.assertEqual(r.status, 200, r)
        self.wait_running(10, 60 + N_REPLICAS * 0.05)
        self.assertTrue(wait_until(lambda: len(srv.replica_pids()) == 10, 60),
                        "%d replica processes left" % len(srv.replica_pids()))
        self.assertEqual(srv.get("/w/after-down").status, 200)
        r = srv.scale("wide", "Hello", N_REPLICAS)
        self.assertEqual(r.status, 200, r)
        self.wait_running(N_REPLICAS, START_BOUND_S)
        self.assertEqual(srv.get("/w/after-up").status, 200)


MANY_LUA = r'''
local serve = require "moonserve"
local N = %d

local leaves = {}
for i = 1, N - 1 do
  local D = serve.deployment { name = "D" .. i }
  function D:__call(req) return { d = i, replica = serve.get_replica_context().replica_id } end
  leaves[i] = D:bind()
end

local Ingress = serve.deployment { name = "Ingress" }
function Ingress:init(leaves) self.leaves = leaves end
function Ingress:__call(req)
  local i = tonumber(req.query.i or "1")
  return self.leaves[i]:remote({}):result()
end

return { app = Ingress:bind(leaves) }
'''

# Every leaf deployment to 2 replicas, the ingress stays at 1.
ALL_TO_TWO = r'''
local M = {}
function M.policy(ctxs)
  local out = {}
  for key, ctx in pairs(ctxs) do
    out[key] = (ctx.deployment_name or key) == "Ingress" and 1 or 2
  end
  return out
end
return M
'''


def as_cfg():
    return {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0,
            "downscale_delay_s": 600, "metrics_interval_s": 0.1, "look_back_period_s": 0.5}


class HundredDeploymentsTest(ScaleServerTestCase):
    NAMES = ["Ingress"] + ["D%d" % i for i in range(1, N_DEPLOYMENTS)]
    FILES = {"many.lua": MANY_LUA % N_DEPLOYMENTS, "all_to_two.lua": ALL_TO_TWO}
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.1}}
    APPLICATIONS = [{
        "name": "many", "route_prefix": "/many", "import_path": "many.lua:app",
        "autoscaling_policy": {"policy_function": "all_to_two.lua:policy"},
        "deployments": [{"name": n, "autoscaling_config": as_cfg()} for n in NAMES]}]

    def deployments(self):
        return self.server.status()["applications"]["many"]["deployments"]

    def test_app_policy_reaches_every_deployment(self):
        def done():
            deps = self.deployments()
            return len(deps) == N_DEPLOYMENTS and all(
                len(running(deps[n])) == (1 if n == "Ingress" else 2) for n in self.NAMES)
        reached = wait_until(done, START_BOUND_S, 0.2)
        deps = self.deployments()
        behind = [n for n in self.NAMES
                  if deps[n]["target_num_replicas"] != (1 if n == "Ingress" else 2)]
        self.assertTrue(reached, "deployments the application policy did not scale: %s" % behind)

    def test_every_deployment_serves_and_is_in_metrics(self):
        res = run_threads(lambda i: self.server.get("/many?i=%d" % i, timeout=30),
                          [(i,) for i in range(1, N_DEPLOYMENTS)], timeout=120)
        self.assertEqual([r.status if r else repr(e) for r, e in res],
                         [200] * (N_DEPLOYMENTS - 1))
        self.assertEqual([r.json()["d"] for r, _ in res], list(range(1, N_DEPLOYMENTS)))
        text = self.metrics()
        listed = re.findall(r'^moonserve_deployment_target_replicas\{application="many",'
                            r'deployment="([^"]+)"\}', text, re.M)
        self.assertEqual(sorted(listed), sorted(self.NAMES))


class LowFileLimitServer(harness.Server):
    """The server under a hard open-files limit of 64: the controller cannot raise it further."""

    def _spawn(self):
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        self.proc = subprocess.Popen(
            [harness.BIN, "run", self.config_path], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=self._stdout, stderr=self._stderr, env=env,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
        self.pid = self.proc.pid


class FileLimitTest(unittest.TestCase):
    def test_spawn_failure_reported_in_status_and_log(self):
        # each replica costs the controller a descriptor or two: 100 cannot fit in 64
        srv = LowFileLimitServer([hello_app("fd", "/fd", {"num_replicas": 100})])
        self.addCleanup(srv.cleanup)
        srv.start()
        dep = srv.wait_status("fd", "Hello", lambda d: "open files" in d.get("message", ""),
                              timeout=30, what="the spawn failure in the message")
        self.assertEqual(dep["status"], "UPSCALING", dep["message"])
        self.assertIn("cannot start more: too many open files", dep["message"])
        self.assertGreater(len(running(dep)), 0)
        self.assertIn("raise its hard open-files limit", srv.stderr_text())
        # the replicas that did start serve, and the controller stops cleanly
        self.assertEqual(srv.get("/fd/n1").status, 200)
        self.assertEqual(srv.stop(), [])


if __name__ == "__main__":
    harness.main()
