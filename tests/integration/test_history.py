"""Decisions explained: GET /api/v1/history on the admin port. Autoscaling decisions under load
(one entry per change, not per tick, with inputs, raw and applied targets, bounds, factors and a
short reason), reloads through the admin API and SIGHUP (requested_by, what changed, the result)
and a broken script's failed reload with its error, replica lifecycle (start, and a replica
killed with SIGKILL: failed then restarting), the filters (kind, app, deployment, since, limit)
and 400s for bad parameters, the bound (MOONSERVE_HISTORY_CAPACITY: the oldest entries go), a
deploy's "config" entry, the admin token, and the per-deployment routing counters in status."""

import os
import signal
import time
import unittest

import harness
from harness import LoadGen, hello_app, start_server, wait_until

CONTROL = {"control_loop": {"interval_s": 0.05}}

POLICY = '''-- policy %s
local M = {}
function M.policy(ctx) return 1, ctx.policy_state end
return M
'''

POLICY_BROKEN = '''local M = {}
function M.policy(ctx)
  local x = = 1
end
return M
'''

REASONS = {"policy", "cold start", "upscale delay pending", "downscale delay pending",
           "clamped to min_replicas", "clamped to max_replicas", "clamped to max_replicas_total",
           "target kept"}
LIFECYCLE_EVENTS = {"starting", "running", "draining", "stopped", "failed", "unhealthy",
                    "restarting", "pending"}


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def applications():
    return [
        hello_app("hello", "/hello", {
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                "target_ongoing_requests": 1, "upscale_delay_s": 0.3, "downscale_delay_s": 0.5,
                "metrics_interval_s": 0.1, "look_back_period_s": 0.3},
            "graceful_shutdown_timeout_s": 2, "graceful_shutdown_wait_loop_s": 0.2}),
        hello_app("fixed", "/fixed", {"num_replicas": 1, "graceful_shutdown_timeout_s": 2}),
        hello_app("pol", "/pol", {
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 1, "metrics_interval_s": 0.1,
                "look_back_period_s": 0.3,
                "policy": {"policy_function": "mypolicy.lua:policy"}},
            "graceful_shutdown_timeout_s": 2}),
    ]


class HistoryTest(harness.ServerTestCase):
    APPLICATIONS = applications()
    FILES = {"mypolicy.lua": POLICY % "v1"}
    EXTRA_CONFIG = CONTROL

    def history(self, query=""):
        r = self.server.admin_request("GET", "/api/v1/history" + query)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def wait_history(self, query, pred, timeout=15, what="entries"):
        last = [None]

        def ok():
            last[0] = self.history(query)
            return pred(last[0])
        if not wait_until(ok, timeout):
            raise AssertionError("history%s: %s not seen within %ss; last: %r\nstderr:\n%s"
                                 % (query, what, timeout, last[0], self.server.stderr_tail(2000)))
        return last[0]

    def now(self):
        return time.time()

    # -- autoscaling --------------------------------------------------------------------------

    def test_autoscaling_decisions_under_load(self):
        srv = self.server
        srv.wait_status("hello", "Hello", lambda d: len(running(d)) == 1, what="1 replica")
        since = self.now()
        with LoadGen(srv, "/hello/load?sleep=0.3&w={i}", 3) as load:
            srv.wait_status("hello", "Hello", lambda d: (d.get("target_num_replicas") or 0) >= 2,
                            timeout=15, what="upscale under load")
        self.assertEqual(load.failures, [])
        doc = self.wait_history(
            "?kind=autoscaling&app=hello&since=%f" % since,
            lambda h: any(e["applied_target"] > e["previous_target"] for e in h["autoscaling"]),
            what="an upscale decision")
        self.assertEqual(set(doc), {"autoscaling"})
        entries = doc["autoscaling"]
        for e in entries:
            self.assertEqual((e["application"], e["deployment"], e["scope"]), ("hello", "Hello",
                                                                               "deployment"), e)
            self.assertGreater(e["time"], since)
            self.assertEqual(e["policy_version"], 1)
            for k in ("total_ongoing_requests", "total_queued_requests", "running_replicas",
                      "current_target"):
                self.assertIn(k, e["inputs"], e)
            self.assertEqual(e["inputs"]["current_target"], e["previous_target"])
            self.assertEqual(e["bounds"], {"min_replicas": 1, "max_replicas": 3})
            self.assertIsInstance(e["factors"]["upscaling_factor"], (int, float))
            self.assertIn("downscaling_factor", e["factors"])
            self.assertIn(e["reason"], REASONS, e)
            self.assertLessEqual(e["applied_target"], 3)
            self.assertIsInstance(e["raw_target"], (int, float))
        times = [e["time"] for e in entries]
        self.assertEqual(times, sorted(times), "not oldest first")
        up = [e for e in entries if e["applied_target"] > e["previous_target"]][0]
        self.assertGreater(up["inputs"]["total_ongoing_requests"], 0, up)
        # the upscale waited for upscale_delay_s first, and that shows
        self.assertIn("upscale delay pending", [e["reason"] for e in entries], entries)
        # one entry per change: never two in a row that change nothing
        for a, b in zip(entries, entries[1:]):
            self.assertFalse(a["raw_target"] == b["raw_target"] and a["reason"] == b["reason"]
                             and b["applied_target"] == b["previous_target"],
                             "a decision that changed nothing was recorded: %r %r" % (a, b))
        # a quiet deployment does not fill the history tick after tick
        quiet_since = self.now()
        fixed = self.history("?kind=autoscaling&app=pol&since=%f" % quiet_since)
        # ten control ticks of a deployment whose policy always answers 1 (counted, not slept)
        ticks = self.server.status()["control_loop"]["ticks"]
        self.assertTrue(wait_until(
            lambda: self.server.status()["control_loop"]["ticks"] >= ticks + 10, 10))
        later = self.history("?kind=autoscaling&app=pol&since=%f" % quiet_since)
        self.assertEqual(later, fixed)

    # -- reloads ------------------------------------------------------------------------------

    def reload_entries(self, since, **match):
        doc = self.history("?kind=reloads&since=%f&limit=1000" % since)
        return [e for e in doc["reloads"] if all(e.get(k) == v for k, v in match.items())]

    def test_reload_admin_then_sighup(self):
        since = self.now()
        self.server.write_file("mypolicy.lua", POLICY % "v2")
        status, body = self.server.reload()
        self.assertEqual(status, 200, body)
        mine = self.reload_entries(since, kind="autoscaling_policy", application="pol")
        self.assertEqual(len(mine), 1, mine)
        e = mine[0]
        self.assertEqual(e["requested_by"], "admin")
        self.assertEqual(e["result"], "ok")
        self.assertIsNone(e["error"])
        self.assertEqual(e["deployment"], "Hello")
        self.assertTrue(e["path"].endswith("mypolicy.lua"), e)
        self.assertTrue(any(c.startswith("sha256 ") for c in e["changed"]), e)
        self.assertTrue(any(c.startswith("version ") for c in e["changed"]), e)
        version = e["version"]
        # every script of the reload is there: the built-in routers too
        routers = self.reload_entries(since, kind="router")
        self.assertEqual({r["application"] for r in routers}, {"hello", "fixed", "pol"})
        self.assertEqual(len({r["reload"] for r in routers + mine}), 1)

        since = self.now()
        self.server.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: self.reload_entries(
            since, kind="autoscaling_policy", application="pol"), 10), "no SIGHUP reload entry")
        e = self.reload_entries(since, kind="autoscaling_policy", application="pol")[0]
        self.assertEqual(e["requested_by"], "sighup")
        self.assertEqual(e["result"], "ok")
        self.assertEqual(e["version"], version + 1)
        self.assertFalse(any(c.startswith("sha256 ") for c in e["changed"]), e)  # same file

    def test_failed_reload_has_its_error(self):
        since = self.now()
        self.server.write_file("mypolicy.lua", POLICY_BROKEN)
        try:
            status, body = self.server.reload()
            self.assertEqual(status, 422, body)
        finally:
            self.server.write_file("mypolicy.lua", POLICY % "restored")
        e = self.reload_entries(since, kind="autoscaling_policy", application="pol")[0]
        self.assertEqual(e["result"], "failed")
        self.assertEqual(e["requested_by"], "admin")
        self.assertIn("mypolicy.lua:3:", e["error"])
        # the scripts that were fine were not applied either, and say so
        routers = self.reload_entries(since, kind="router")
        self.assertTrue(routers)
        for r in routers:
            self.assertEqual(r["result"], "failed", r)
            self.assertIn("another script", r["error"])
        status, body = self.server.reload()
        self.assertEqual(status, 200, body)

    # -- lifecycle ----------------------------------------------------------------------------

    def test_lifecycle_start_and_killed_replica(self):
        srv = self.server
        doc = self.history("?kind=lifecycle&app=fixed&limit=1000")
        self.assertEqual(set(doc), {"lifecycle"})
        events = [e["event"] for e in doc["lifecycle"]]
        self.assertIn("starting", events)
        self.assertIn("running", events)
        for e in doc["lifecycle"]:
            self.assertEqual((e["application"], e["deployment"]), ("fixed", "Hello"))
            self.assertIn(e["event"], LIFECYCLE_EVENTS)
            self.assertIn("reason", e)
        dep = srv.wait_status("fixed", "Hello", lambda d: len(running(d)) == 1, what="1 replica")
        victim = running(dep)[0]
        since = self.now()
        os.kill(victim["pid"], signal.SIGKILL)
        doc = self.wait_history(
            "?kind=lifecycle&app=fixed&since=%f" % since,
            lambda h: "running" in [e["event"] for e in h["lifecycle"]
                                    if e["replica"] != victim["replica_id"]],
            what="failed, restarting, then a new replica running")
        mine = [e for e in doc["lifecycle"] if e["replica"] == victim["replica_id"]]
        self.assertEqual([e["event"] for e in mine], ["failed", "restarting"], doc)
        self.assertEqual(mine[0]["reason"], "killed by signal 9")
        self.assertEqual(mine[0]["replica_tag"], victim["replica_tag"])
        new = [e["event"] for e in doc["lifecycle"] if e["replica"] != victim["replica_id"]]
        self.assertEqual(new[:2], ["starting", "running"], doc)

    # -- filters, limit, since, parameters ------------------------------------------------------

    def test_filters_limit_and_since(self):
        everything = self.history("?limit=1000")
        self.assertEqual(set(everything), {"autoscaling", "reloads", "lifecycle"})
        self.assertTrue(everything["lifecycle"])
        default = self.history()
        for kind in everything:
            self.assertLessEqual(len(default[kind]), 100)
            self.assertEqual(default[kind], everything[kind][-100:])
        two = self.history("?kind=reloads,lifecycle")
        self.assertEqual(set(two), {"reloads", "lifecycle"})
        apps = self.history("?app=fixed&limit=1000")
        for kind in apps:
            for e in apps[kind]:
                self.assertEqual(e["application"], "fixed", e)
        self.assertTrue(apps["lifecycle"])
        self.assertEqual(self.history("?app=nope"),
                         {"autoscaling": [], "reloads": [], "lifecycle": []})
        deps = self.history("?kind=lifecycle&deployment=Hello&app=hello&limit=1000")
        self.assertTrue(deps["lifecycle"])
        self.assertTrue(all(e["deployment"] == "Hello" and e["application"] == "hello"
                            for e in deps["lifecycle"]))
        lc = everything["lifecycle"]
        one = self.history("?kind=lifecycle&limit=1")["lifecycle"]
        self.assertEqual(len(one), 1)
        self.assertEqual(one[0]["time"], self.history("?kind=lifecycle&limit=1000")
                         ["lifecycle"][-1]["time"])
        if len(lc) >= 2:
            pivot = lc[len(lc) // 2]["time"]
            after = self.history("?kind=lifecycle&limit=1000&since=%r" % pivot)["lifecycle"]
            self.assertTrue(all(e["time"] > pivot for e in after))
            self.assertEqual(after, [e for e in lc if e["time"] > pivot][:len(after)])
        future = self.history("?since=%f" % (time.time() + 3600))
        self.assertEqual(future, {"autoscaling": [], "reloads": [], "lifecycle": []})

    def test_bad_parameters_are_400(self):
        for q in ("kind=bogus", "kind=reloads,bogus", "kind=", "limit=0", "limit=1001",
                  "limit=abc", "limit=1.5", "since=abc", "since=nan", "since=inf", "app=",
                  "deployment=", "app=%zz"):
            r = self.server.admin_request("GET", "/api/v1/history?" + q)
            body = self.assertErrorJSON(r, 400)
            self.assertIn("Invalid", body.get("error", ""), (q, body))
        r = self.server.admin_request("POST", "/api/v1/history",
                                      headers={"Content-Type": "application/json"})
        self.assertErrorJSON(r, 405)
        self.assertEqual(len(self.history("?limit=1000&kind=lifecycle&since=0")["lifecycle"]),
                         len(self.history("?limit=1000&kind=lifecycle")["lifecycle"]))

    # -- routing ------------------------------------------------------------------------------

    def test_routing_counters_grow_with_traffic(self):
        srv = self.server
        before = srv.deployment_status("fixed", "Hello")["routing"]
        self.assertEqual(set(before), {"rank_served", "fallbacks", "backoffs", "budget_overruns",
                                       "router_errors"})
        self.assertEqual(set(before["rank_served"]), {"1", "2", "3+"})
        srv.wait_status("fixed", "Hello", lambda d: len(running(d)) == 1, what="1 replica")
        for k in range(10):
            self.assertEqual(srv.get("/fixed/r%d" % k).status, 200)
        after = srv.deployment_status("fixed", "Hello")["routing"]
        served = sum(after["rank_served"].values()) - sum(before["rank_served"].values())
        self.assertGreaterEqual(served, 10, (before, after))
        self.assertEqual(after["router_errors"], 0)
        self.assertEqual(after["fallbacks"], 0)


class BoundAndDeployTest(unittest.TestCase):
    """A history holds MOONSERVE_HISTORY_CAPACITY entries: the oldest go first. Behind a token,
    as every admin endpoint."""

    def test_bound_deploy_entry_and_token(self):
        srv = start_server(self, [hello_app("hello", "/hello", {"num_replicas": 1})],
                           extra_config={"admin": {"token": "s3cret"}},
                           env={"MOONSERVE_HISTORY_CAPACITY": "3"})
        r = srv.admin_request("GET", "/api/v1/history", token="")
        self.assertEqual(r.status, 401, r)
        r = srv.admin_request("GET", "/api/v1/history", token="wrong")
        self.assertEqual(r.status, 401, r)

        cfg = {"http_options": srv.http_options,
               "admin": {"host": srv.host, "port": srv.admin_port, "token": "s3cret"},
               "applications": [hello_app("hello", "/hello", {"num_replicas": 1}),
                                hello_app("more", "/more", {"num_replicas": 1})]}
        r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 200, r)
        reloads = srv.admin_request("GET", "/api/v1/history?kind=reloads").json()["reloads"]
        self.assertEqual(len(reloads), 1, reloads)
        e = reloads[0]
        self.assertEqual((e["kind"], e["requested_by"], e["result"], e["version"]),
                         ("config", "deploy", "ok", 1))
        self.assertIsNone(e["application"])
        self.assertIn("more/Hello: started", e["changed"])
        self.assertIn("hello/Hello: settings applied in place", e["changed"])
        bad = dict(cfg, applications=[{"name": "x"}])
        r = srv.admin_request("PUT", "/api/serve/applications/", body=bad, timeout=30)
        self.assertEqual(r.status, 400, r)
        reloads = srv.admin_request("GET", "/api/v1/history?kind=reloads").json()["reloads"]
        self.assertEqual((reloads[-1]["result"], reloads[-1]["version"]), ("failed", 1))
        self.assertTrue(reloads[-1]["error"])

        # two routers a reload: 3 reloads push the deploys out, 3 entries stay, newest kept
        for _ in range(3):
            status, body = srv.reload()
            self.assertEqual(status, 200, body)
        reloads = srv.admin_request("GET", "/api/v1/history?kind=reloads").json()["reloads"]
        self.assertEqual(len(reloads), 3, reloads)
        self.assertEqual([e["kind"] for e in reloads], ["router"] * 3)
        self.assertEqual([e["reload"] for e in reloads], [2, 3, 3])
        lifecycle = srv.admin_request("GET", "/api/v1/history?kind=lifecycle").json()
        self.assertLessEqual(len(lifecycle["lifecycle"]), 3)
        srv.stop()


if __name__ == "__main__":
    harness.main()
