"""Autoscaling end to end: the built-in policy's delays (upscale after upscale_delay_s of sustained
load, not before; downscale only after downscale_delay_s), scale to zero and back (a request at
zero replicas is held and served; cold start skips the upscale delay), replicas slow to start
keeping their target while none runs, custom deployment policies (policy_state kept across
ticks, every context field, custom metrics from record_autoscaling_stats, dry_run),
application-level policies taking precedence (with a warning), and broken policies (error,
infinite loop, infinite loop under pcall, memory bomb) that never stop the engine from serving
or the control loop from ticking.

Everything is observed through the admin status document
(GET /api/serve/applications/ on the server's own admin port) and the replica processes."""

import time
import unittest

import harness
from harness import LoadGen, hello_app, start_server

CONTROL = {"control_loop": {"interval_s": 0.05}}


def as_cfg(**kw):
    cfg = {"metrics_interval_s": 0.1, "look_back_period_s": 0.5}
    cfg.update(kw)
    return cfg


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def decisions(dep):
    return ((dep.get("autoscaling") or {}).get("recent_decisions")) or []


def hello_dep(autoscaling, **extra):
    d = {"autoscaling_config": autoscaling, "graceful_shutdown_timeout_s": 2,
         "graceful_shutdown_wait_loop_s": 0.2}
    d.update(extra)
    return d


# ------------------------------------------------------------------------------------------------
# built-in policy: delays


class BuiltinPolicyTest(unittest.TestCase):

    def test_upscale_after_delay_and_downscale_after_delay(self):
        U, D = 2.0, 1.5
        srv = start_server(self, [hello_app("hello", "/hello", hello_dep(as_cfg(
            min_replicas=1, max_replicas=3, initial_replicas=1, target_ongoing_requests=1,
            upscale_delay_s=U, downscale_delay_s=D)))], extra_config=CONTROL)
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 1
                        and len(running(d)) == 1, what="1 running replica")
        srv.wait_replicas(1)

        load = LoadGen(srv, "/hello/load?sleep=0.4&w={i}", 3)
        t0 = time.monotonic()
        load.start()
        try:
            # at 40% of upscale_delay_s the target must not have moved yet
            time.sleep(0.4 * U)
            dep = srv.deployment_status("hello", "Hello")
            self.assertEqual(dep.get("target_num_replicas"), 1,
                             "scaled up after %.2fs, before upscale_delay_s=%.1f: %r"
                             % (time.monotonic() - t0, U, dep))
            dep = srv.wait_status("hello", "Hello",
                                  lambda d: (d.get("target_num_replicas") or 0) >= 2,
                                  timeout=U + 6, what="upscale under sustained load")
            t1 = time.monotonic()
            self.assertGreaterEqual(t1 - t0, U - 0.05,
                                    "upscaled %.2fs after the load began, upscale_delay_s=%.1f"
                                    % (t1 - t0, U))
            # 3 in flight with target_ongoing_requests 1 -> 3 replicas, all running
            srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 3
                            and len(running(d)) == 3, timeout=10, what="3 running replicas")
            srv.wait_replicas(3)
            self.assertTrue(decisions(dep) or decisions(srv.deployment_status("hello", "Hello")),
                            "no recent_decisions in status")
        finally:
            ts = time.monotonic()
            load.stop()
        self.assertEqual(load.failures, [], "requests failed while scaling up")
        self.assertGreater(load.count, 10)

        time.sleep(max(0.0, ts + 0.4 * D - time.monotonic()))
        dep = srv.deployment_status("hello", "Hello")
        self.assertEqual(dep.get("target_num_replicas"), 3,
                         "scaled down %.2fs after the load stopped, before downscale_delay_s=%.1f"
                         % (time.monotonic() - ts, D))
        srv.wait_status("hello", "Hello", lambda d: (d.get("target_num_replicas") or 9) < 3,
                        timeout=D + 8, what="downscale after the load stopped")
        t3 = time.monotonic()
        self.assertGreaterEqual(t3 - ts, D - 0.05,
                                "downscaled %.2fs after the load stopped, downscale_delay_s=%.1f"
                                % (t3 - ts, D))
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 1
                        and len(running(d)) == 1, timeout=D + 10, what="back to 1 replica")
        srv.wait_replicas(1, timeout=10)
        self.assertEqual(srv.get("/hello/after").status, 200)
        srv.stop()

    def test_num_replicas_auto_starts_and_serves(self):
        srv = start_server(self, [hello_app("hello", "/hello", hello_dep(
            as_cfg(min_replicas=2, max_replicas=4), num_replicas="auto"))],
            extra_config=CONTROL)
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 2
                        and len(running(d)) == 2, what="min_replicas 2 running")
        self.assertEqual(srv.get("/hello/x").status, 200)
        srv.stop()


# ------------------------------------------------------------------------------------------------
# scale to zero and back


class ScaleToZeroTest(unittest.TestCase):

    def test_down_to_zero_then_cold_request_is_held_and_served(self):
        # upscale_delay_s is long: a cold start must skip it
        srv = start_server(self, [hello_app("hello", "/hello", hello_dep(as_cfg(
            min_replicas=0, max_replicas=2, initial_replicas=1, target_ongoing_requests=1,
            upscale_delay_s=30, downscale_delay_s=0.5, downscale_to_zero_delay_s=1.0,
            look_back_period_s=0.3)))], extra_config=CONTROL)
        t0 = time.monotonic()
        # in flight over several samples, so the zero delay is timed from after it (a request
        # served between two samples would leave a run started before t0 going)
        self.assertEqual(srv.get("/hello/warm?sleep=0.2").status, 200)
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 0
                        and not running(d), timeout=10, what="scaled to zero")
        self.assertGreaterEqual(time.monotonic() - t0, 1.0 - 0.05,
                                "reached zero before downscale_to_zero_delay_s")
        srv.wait_replicas(0, timeout=10)
        self.assertEqual(srv.get("/-/healthz").status, 200)

        t1 = time.monotonic()
        r = srv.get("/hello/cold", timeout=20)
        took = time.monotonic() - t1
        self.assertEqual(r.status, 200, r)
        self.assertLess(took, 10.0, "cold request took %.1fs (upscale_delay_s=30 must be "
                                    "skipped at zero replicas)" % took)
        dep = srv.deployment_status("hello", "Hello")
        self.assertGreaterEqual(dep.get("target_num_replicas") or 0, 1, dep)

        # down again, then several requests at once: all held and served
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 0
                        and not running(d), timeout=10, what="scaled to zero again")
        srv.wait_replicas(0, timeout=10)
        res = harness.run_threads(lambda i: srv.get("/hello/cold%d" % i, timeout=20),
                                  [(i,) for i in range(5)], timeout=25)
        for r, e in res:
            self.assertIsNone(e)
            self.assertEqual(r.status, 200, r)
        srv.stop()

    def test_starts_at_zero_and_first_request_served(self):
        srv = start_server(self, [hello_app("hello", "/hello", hello_dep(as_cfg(
            min_replicas=0, max_replicas=1, initial_replicas=0, upscale_delay_s=30,
            downscale_delay_s=30)))], extra_config=CONTROL)
        dep = srv.deployment_status("hello", "Hello")
        self.assertEqual(dep.get("target_num_replicas"), 0, dep)
        self.assertEqual(srv.replica_pids(), [])
        r = srv.get("/hello/first", timeout=20)
        self.assertEqual(r.status, 200, r)
        srv.wait_status("hello", "Hello", lambda d: len(running(d)) == 1, what="1 running")
        srv.stop()


# ------------------------------------------------------------------------------------------------
# replicas slow to start

GATED_LUA = r'''
-- replicas stay in their constructor until the file named by the app's args exists
local serve = require "moonserve"
local Gated = serve.deployment { name = "Gated" }
function Gated:init(go)
  while true do
    local f = io.open(go, "r")
    if f then f:close(); return end
    os.execute("sleep 0.05")
  end
end
function Gated:__call(req) return { ok = true } end
return { build = function(args) return Gated:bind(args.go) end }
'''


class StartingReplicasTest(unittest.TestCase):

    def test_target_holds_until_starting_replicas_run(self):
        # No traffic and short delays: replicas still in their constructor must not be scaled
        # away (Ray holds the target while none runs); once they run, the usual downscale.
        srv = start_server(self, [{
            "name": "gated", "route_prefix": "/gated", "import_path": "gated.lua:build",
            "args": {"go": "go"},  # replicas run in the server's folder
            "deployments": [dict(hello_dep(as_cfg(
                min_replicas=0, max_replicas=3, initial_replicas=3, upscale_delay_s=0,
                downscale_delay_s=0.2, downscale_to_zero_delay_s=0.2)), name="Gated")]}],
            files={"gated.lua": GATED_LUA}, extra_config=CONTROL)
        first = {}

        def held_long_enough(d):
            self.assertEqual(running(d), [], "a replica ran before the gate opened: %r" % d)
            self.assertEqual(d.get("target_num_replicas"), 3,
                             "the target moved while no replica ran: %r" % d)
            times = [x.get("now") for x in decisions(d) if x.get("now")]
            if not times:
                return False
            first.setdefault("t", min(times))
            # 1 s of decisions: more than twice downscale_delay_s + downscale_to_zero_delay_s
            return max(times) - first["t"] >= 1.0
        dep = srv.wait_status("gated", "Gated", held_long_enough, timeout=15,
                              what="1 s of decisions with no replica running")
        self.assertIn("hold at 3: no replica running", decisions(dep)[-1].get("reason", ""), dep)

        srv.write_file("go", "")
        dep = srv.wait_status("gated", "Gated", lambda d: (d.get("target_num_replicas") or 0) < 3,
                              timeout=15, what="the usual downscale once replicas run")
        lowered = [x for x in decisions(dep) if x.get("target", 3) < x.get("previous_target", 0)]
        self.assertTrue(lowered, dep)
        self.assertGreaterEqual(lowered[0].get("current_replicas") or 0, 1,
                                "the target went down before any replica ran: %r" % lowered)
        srv.stop()


# ------------------------------------------------------------------------------------------------
# custom deployment policies

TICKS_POLICY = r'''
-- counts ticks in policy_state; asks for 2 replicas from the 10th tick on
local M = {}
function M.policy(ctx)
  local st = ctx.policy_state or {}
  st.ticks = (st.ticks or 0) + 1
  if st.ticks >= 10 then return 2, st end
  return 1, st
end
return M
'''

# raw target = tick count: recent_decisions' raw_target shows the state growing
COUNT_POLICY = r'''
local M = {}
function M.policy(ctx)
  local st = ctx.policy_state
  st.n = (st.n or 0) + 1
  return st.n, st
end
return M
'''

CTX_POLICY = r'''
local M = {}
local REQUIRED = { "deployment_name", "app_name", "current_num_replicas", "target_num_replicas",
  "running_replicas", "total_num_requests", "total_queued_requests", "aggregated_metrics",
  "raw_metrics", "capacity_adjusted_min_replicas", "capacity_adjusted_max_replicas",
  "policy_state", "current_time", "config" }
function M.policy(ctx)
  for _, k in ipairs(REQUIRED) do
    if ctx[k] == nil then error("ctx." .. k .. " is missing") end
  end
  if ctx.deployment_name ~= "Hello" then error("deployment_name " .. tostring(ctx.deployment_name)) end
  if ctx.app_name ~= "ctx" then error("app_name " .. tostring(ctx.app_name)) end
  if type(ctx.config) ~= "table" or ctx.config.max_replicas ~= 2 then
    error("ctx.config.max_replicas is not 2")
  end
  if ctx.capacity_adjusted_max_replicas ~= 2 then error("capacity_adjusted_max_replicas") end
  if type(ctx.running_replicas) ~= "table" then error("running_replicas not a table") end
  return 2, ctx.policy_state
end
return M
'''

DRY_POLICY = r'''
local M = {}
function M.policy(ctx) return 3, ctx.policy_state end
return M
'''

METRICS_POLICY = r'''
-- target = the largest "want" any replica reports through record_autoscaling_stats
local M = {}
function M.policy(ctx)
  local m = ctx.aggregated_metrics and ctx.aggregated_metrics.want
  if not m then return ctx.target_num_replicas, ctx.policy_state end
  local best = 0
  for _, v in pairs(m) do if v > best then best = v end end
  if best < 1 then return ctx.target_num_replicas, ctx.policy_state end
  return best, ctx.policy_state
end
return M
'''

KWARGS_POLICY = r'''
-- the target comes from policy_kwargs (the second argument)
local M = {}
function M.policy(ctx, kwargs)
  if type(kwargs) ~= "table" then error("no kwargs") end
  return kwargs.replicas, ctx.policy_state
end
return M
'''

METRICS_LUA = r'''
local serve = require "moonserve"
local Metric = serve.deployment { name = "Metric" }
function Metric:__call(req) return { replica = serve.get_replica_context().replica_id } end
function Metric:record_autoscaling_stats() return { want = 3, other = 0.5 } end
return { app = Metric:bind() }
'''


def policy_dep(fn, dry_run=None, kwargs=None, **kw):
    cfg = as_cfg(min_replicas=1, max_replicas=kw.pop("max_replicas", 3), upscale_delay_s=0,
                 downscale_delay_s=30, **kw)
    cfg["policy"] = {"policy_function": fn}
    if kwargs is not None:
        cfg["policy"]["policy_kwargs"] = kwargs
    if dry_run is not None:
        cfg["policy"]["dry_run"] = dry_run
    return hello_dep(cfg)


class CustomPolicyTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"ticks.lua": TICKS_POLICY, "count.lua": COUNT_POLICY, "ctxp.lua": CTX_POLICY,
             "dry.lua": DRY_POLICY, "mpolicy.lua": METRICS_POLICY, "metric.lua": METRICS_LUA,
             "kw.lua": KWARGS_POLICY}
    APPLICATIONS = [
        hello_app("ticks", "/ticks", policy_dep("ticks.lua:policy")),
        hello_app("count", "/count", policy_dep("count.lua:policy", max_replicas=1)),
        hello_app("ctx", "/ctx", policy_dep("ctxp.lua:policy", max_replicas=2)),
        hello_app("dry", "/dry", policy_dep("dry.lua:policy", dry_run=True)),
        hello_app("kw", "/kw", policy_dep("kw.lua:policy", kwargs={"replicas": 2})),
        {"name": "metric", "route_prefix": "/metric", "import_path": "metric.lua:app",
         "deployments": [dict(policy_dep("mpolicy.lua:policy"), name="Metric")]},
    ]

    def test_policy_state_persists_across_ticks(self):
        srv = self.server
        dep = srv.wait_status("ticks", "Hello", lambda d: d.get("target_num_replicas") == 2
                              and len(running(d)) == 2, timeout=10,
                              what="target 2 from the tick-counting policy")
        self.assertEqual(((dep.get("autoscaling") or {}).get("policy") or {}).get("failures", 0), 0, dep)
        self.assertEqual(len({r.get("pid") for r in running(dep)}), 2, dep)

    def test_raw_target_grows_with_state(self):
        srv = self.server
        dep = srv.wait_status("count", "Hello",
                              lambda d: any((x.get("raw_target") or 0) >= 20 for x in decisions(d)),
                              timeout=10, what="raw_target counting up to 20")
        raws = [x.get("raw_target") for x in decisions(dep)]
        self.assertEqual(raws, sorted(raws), "raw targets should only grow: %r" % raws)
        # bounds are applied on top of the raw answer
        self.assertEqual(dep.get("target_num_replicas"), 1, dep)
        self.assertEqual(len(running(dep)), 1, dep)

    def test_context_fields(self):
        dep = self.server.wait_status("ctx", "Hello", lambda d: d.get("target_num_replicas") == 2
                                      or ((d.get("autoscaling") or {}).get("policy") or {}).get("last_error"),
                                      timeout=10, what="ctx policy decided or failed")
        a = (dep.get("autoscaling") or {}).get("policy") or {}
        self.assertFalse(a.get("last_error"), "policy failed on the context: %r" % a)
        self.assertEqual(dep.get("target_num_replicas"), 2, dep)

    def test_custom_metrics_reach_the_policy(self):
        dep = self.server.wait_status("metric", "Metric",
                                      lambda d: d.get("target_num_replicas") == 3
                                      and len(running(d)) == 3, timeout=10,
                                      what="target 3 from record_autoscaling_stats")
        self.assertFalse(((dep.get("autoscaling") or {}).get("policy") or {}).get("last_error"), dep)

    def test_policy_kwargs_reach_the_policy(self):
        dep = self.server.wait_status("kw", "Hello", lambda d: d.get("target_num_replicas") == 2
                                      or ((d.get("autoscaling") or {}).get("policy") or {}).get("last_error"),
                                      timeout=10, what="kwargs policy decided or failed")
        self.assertFalse(((dep.get("autoscaling") or {}).get("policy") or {}).get("last_error"), dep)
        self.assertEqual(dep.get("target_num_replicas"), 2, dep)

    def test_dry_run_records_but_does_not_apply(self):
        srv = self.server
        dep = srv.wait_status("dry", "Hello",
                              lambda d: any(x.get("applied") in (False, 0) and
                                            (x.get("target") == 3 or x.get("raw_target") == 3)
                                            for x in decisions(d)),
                              timeout=10, what="dry_run decision for 3 recorded, not applied")
        self.assertFalse(any(x.get("applied") in (True, 1) for x in decisions(dep)),
                         "a dry_run decision was applied: %r" % decisions(dep))
        time.sleep(1.0)
        dep = srv.deployment_status("dry", "Hello")
        self.assertEqual(dep.get("target_num_replicas"), 1, dep)
        self.assertEqual(len(running(dep)), 1, dep)
        pol = (dep.get("autoscaling") or {}).get("policy") or {}
        self.assertTrue(pol, "no policy info in status: %r" % dep)




# ------------------------------------------------------------------------------------------------
# application-level policy

APP_POLICY = r'''
-- application level: Model gets 2 replicas, Ingress 1 (whatever their own policies say)
local M = {}
function M.app_policy(ctxs)
  local out, states = {}, {}
  for key, ctx in pairs(ctxs) do
    local name = ctx.deployment_name or key
    out[key] = (name == "Model") and 2 or 1
    states[key] = ctx.policy_state
  end
  return out, states
end
return M
'''

DEP_POLICY_3 = r'''
local M = {}
function M.policy(ctx) return 3, ctx.policy_state end
return M
'''


class AppPolicyTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"app_policy.lua": APP_POLICY, "dep3.lua": DEP_POLICY_3}
    APPLICATIONS = [{
        "name": "comp", "route_prefix": "/comp", "import_path": "compose.lua:app",
        "autoscaling_policy": {"policy_function": "app_policy.lua:app_policy"},
        "deployments": [
            {"name": "Ingress", "autoscaling_config": as_cfg(min_replicas=1, max_replicas=3,
                                                             upscale_delay_s=0,
                                                             downscale_delay_s=30)},
            {"name": "Model", "autoscaling_config": dict(as_cfg(
                min_replicas=1, max_replicas=3, upscale_delay_s=0, downscale_delay_s=30),
                policy={"policy_function": "dep3.lua:policy"})},
        ]}]

    def test_app_level_policy_takes_precedence(self):
        srv = self.server
        srv.wait_status("comp", "Model", lambda d: d.get("target_num_replicas") == 2
                        and len(running(d)) == 2, timeout=10,
                        what="Model at 2 (the app-level policy's answer)")
        time.sleep(0.5)
        model = srv.deployment_status("comp", "Model")
        ingress = srv.deployment_status("comp", "Ingress")
        self.assertEqual(model.get("target_num_replicas"), 2,
                         "the deployment policy (3) won over the app-level one (2): %r" % model)
        self.assertEqual(ingress.get("target_num_replicas"), 1, ingress)
        r = srv.get("/comp?x=2")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json().get("y"), 6)

    def test_z_app_policy_reloads(self):
        # runs last in the class: Model goes to 3 with the edited application policy
        srv = self.server
        srv.write_file("app_policy.lua", APP_POLICY.replace('and 2 or 1', 'and 3 or 1'))
        code, body = srv.reload()
        self.assertEqual(code, 200, body)
        entries = [e for e in body.get("scripts") or []
                   if str(e.get("path", "")).endswith("app_policy.lua")]
        self.assertTrue(entries, body)
        self.assertEqual(entries[0].get("version"), 2, entries)
        srv.wait_status("comp", "Model", lambda d: d.get("target_num_replicas") == 3
                        and len(running(d)) == 3, timeout=10,
                        what="Model at 3 after the app policy reload")

    def test_warning_logged_for_both_policies(self):
        text = self.server.stderr_text()
        lines = [ln for ln in text.splitlines() if "warn" in ln.lower() and "polic" in ln.lower()
                 and "Model" in ln]
        self.assertTrue(lines, "no warning naming Model about the app-level policy taking "
                               "precedence; stderr:\n" + text[-3000:])


# ------------------------------------------------------------------------------------------------
# broken policies never stop the engine

SPIN_POLICY = r'''
local M = {}
function M.policy(ctx) while true do end end
return M
'''

PCALL_SPIN_POLICY = r'''
local M = {}
function M.policy(ctx)
  while true do pcall(function() while true do end end) end
end
return M
'''

BOMB_POLICY = r'''
local M = {}
function M.policy(ctx)
  local t, i = {}, 0
  while true do i = i + 1; t[i] = string.rep("x", 65536) .. i end
end
return M
'''

ERROR_POLICY = r'''
local M = {}
function M.policy(ctx)
  error("policy exploded")
end
return M
'''

BADANSWER_POLICY = r'''
local M = {}
function M.policy(ctx) return "many", ctx.policy_state end
return M
'''


class PolicyFailureTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"spin.lua": SPIN_POLICY, "pspin.lua": PCALL_SPIN_POLICY, "bomb.lua": BOMB_POLICY,
             "err.lua": ERROR_POLICY, "bad.lua": BADANSWER_POLICY, "ticks.lua": TICKS_POLICY}
    APPLICATIONS = [
        hello_app("spin", "/spin", policy_dep("spin.lua:policy")),
        hello_app("pspin", "/pspin", policy_dep("pspin.lua:policy")),
        hello_app("bomb", "/bomb", policy_dep("bomb.lua:policy")),
        hello_app("err", "/err", policy_dep("err.lua:policy")),
        hello_app("bad", "/bad", policy_dep("bad.lua:policy")),
        hello_app("good", "/good", policy_dep("ticks.lua:policy")),
    ]

    def _failing(self, app, pattern=None):
        srv = self.server
        dep = srv.wait_status(app, "Hello", lambda d: (((d.get("autoscaling") or {}).get("policy") or {})
                                                       .get("failures") or 0) >= 2,
                              timeout=10, what="policy failures counted")
        a = dep["autoscaling"]["policy"]
        self.assertTrue(a.get("last_error"), "no last_error: %r" % a)
        if pattern:
            self.assertRegex(a["last_error"], pattern)
        # the built-in policy decides instead: no load -> stays at min_replicas
        self.assertEqual(dep.get("target_num_replicas"), 1, dep)
        for i in range(5):
            t = time.monotonic()
            r = srv.get("/%s/x%d" % (app, i), timeout=10)
            self.assertEqual(r.status, 200, r)
            self.assertLess(time.monotonic() - t, 3.0)
        return a

    def test_infinite_loop_policy(self):
        self._failing("spin", r"spin\.lua:\d+:")

    def test_infinite_loop_under_pcall(self):
        self._failing("pspin", r"pspin\.lua:\d+:")

    def test_memory_bomb_policy(self):
        self._failing("bomb")

    def test_error_policy(self):
        self._failing("err", r"err\.lua:\d+: .*policy exploded")

    def test_bad_answer_policy(self):
        self._failing("bad")

    def test_control_loop_keeps_ticking_for_others(self):
        self.server.wait_status("good", "Hello", lambda d: d.get("target_num_replicas") == 2
                                and len(running(d)) == 2, timeout=15,
                                what="the healthy app's policy still applied")
        self.assertEqual(self.server.get("/-/healthz").status, 200)


if __name__ == "__main__":
    harness.main()
