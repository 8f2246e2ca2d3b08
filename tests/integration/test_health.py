"""Replica health checks, as Ray Serve: the controller calls each replica's check_health() every
health_check_period_s; an error, or no answer within health_check_timeout_s, is a failure; three
in a row make the replica unhealthy: it leaves routing, stops, and a new replica replaces it.
A success in between resets the count."""

import time

import harness

HEALTH_LUA = r'''
local serve = require "moonserve"
local H = serve.deployment { name = "H" }
function H:init() self.mode = "ok" end
function H:check_health()
  if self.mode == "error" then error("sick") end
  if self.mode == "slow" then serve.sleep(5) end
end
function H:__call(req)
  if req.query.mode then self.mode = req.query.mode end
  return { mode = self.mode,
           replica = serve.get_replica_context().replica_id }
end
return { app = H:bind() }
'''


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class HealthTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.05}}
    FILES = {"health.lua": HEALTH_LUA}
    APPLICATIONS = [{"name": "h", "route_prefix": "/h", "import_path": "health.lua:app",
                     "deployments": [{"name": "H", "num_replicas": 1,
                                      "health_check_period_s": 0.2,
                                      "health_check_timeout_s": 0.5,
                                      "graceful_shutdown_wait_loop_s": 0.1,
                                      "graceful_shutdown_timeout_s": 1}]}]

    def replica_id(self):
        dep = self.server.wait_status("h", "H", lambda d: len(running(d)) == 1, timeout=10,
                                      what="one running replica")
        return running(dep)[0]["replica_id"]

    def replaced(self, old):
        return self.server.wait_status(
            "h", "H", lambda d: len(running(d)) == 1 and running(d)[0]["replica_id"] != old,
            timeout=10, what="the replica replaced")

    def test_1_healthy_replica_stays(self):
        first = self.replica_id()
        time.sleep(1.0)  # five periods of passing checks
        self.assertEqual(self.replica_id(), first)
        self.assertNotIn("health check failed", self.server.stderr_text())

    def test_2_failing_check_health_replaces_the_replica(self):
        old = self.replica_id()
        r = self.server.get("/h/x?mode=error")
        self.assertEqual(r.status, 200, r)
        self.replaced(old)
        log = self.server.stderr_text()
        self.assertIn("health check failed (3 in a row)", log)
        self.assertIn("unhealthy", log)
        r = self.server.get("/h/x")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["mode"], "ok")

    def test_3_check_timing_out_replaces_the_replica(self):
        old = self.replica_id()
        self.assertEqual(self.server.get("/h/x?mode=slow").status, 200)
        self.replaced(old)
        self.assertIn("no answer within health_check_timeout_s", self.server.stderr_text())


if __name__ == "__main__":
    harness.main()
