"""A rolling update whose new code crash-loops in its constructor (Ray Serve semantics): the
deployment's status turns DEPLOY_FAILED (trigger REPLICA_STARTUP_FAILED) with the constructor's
error in its message, in the admin status and in `moonserve status`, while the previous version
keeps serving every request; a fixed redeploy brings it back to HEALTHY and the application to
RUNNING."""

import harness
from harness import LoadGen, hello_app, run_cli

FAST_STOP = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 3}

BROKEN_LUA = r'''
local serve = require "moonserve"
local Hello = serve.deployment { name = "Hello" }
function Hello:init() error("v2 constructor is broken") end
function Hello:__call(req) return "v2" end
return { app = Hello:bind() }
'''

FIXED_LUA = r'''
local serve = require "moonserve"
local Hello = serve.deployment { name = "Hello" }
function Hello:__call(req) return { version = "v3" } end
return { app = Hello:bind() }
'''


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class FailedUpdateTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", dict(num_replicas=2, **FAST_STOP))]
    FILES = {"broken.lua": BROKEN_LUA, "fixed.lua": FIXED_LUA}

    def deploy(self, import_path):
        app = hello_app("hello", "/hello", dict(num_replicas=2, **FAST_STOP),
                        import_path=import_path)
        cfg = {"http_options": self.server.http_options,
               "admin": {"host": self.server.host, "port": self.server.admin_port},
               "applications": [app]}
        r = self.server.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 200, r)

    def app_status(self):
        return self.server.status()["applications"]["hello"]["status"]

    def test_failed_update_keeps_old_version_serving(self):
        self.deploy("hello.lua:app")  # v1 (a no-op when it already runs)
        self.server.wait_status("hello", "Hello", lambda d: d["status"] == "HEALTHY",
                                timeout=15, what="HEALTHY")
        v1 = {r["pid"] for r in running(self.server.deployment_status("hello", "Hello"))}
        with LoadGen(self.server, "/hello/x?w={i}", 2) as load:
            self.deploy("broken.lua:app")
            dep = self.server.wait_status(
                "hello", "Hello", lambda d: d["status"] == "DEPLOY_FAILED", timeout=30,
                what="DEPLOY_FAILED for the broken update")
            self.assertEqual(dep["status_trigger"], "REPLICA_STARTUP_FAILED", dep)
            self.assertIn("v2 constructor is broken", dep["message"])
            self.assertIn("previous version keep", dep["message"])
            self.assertEqual({r["pid"] for r in running(dep)}, v1,
                             "the old replicas must keep running")
            self.assertEqual(self.app_status(), "DEPLOY_FAILED")
            rc, out = run_cli("status", "--address",
                              "http://127.0.0.1:%d" % self.server.admin_port, timeout=15)
            self.assertEqual(rc, 0, out)
            self.assertIn("DEPLOY_FAILED", out)
            self.assertIn("v2 constructor is broken", out)
            # the old version still answers while the new one crash-loops
            for k in range(5):
                r = self.server.get("/hello/x?k=%d" % k)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.json().get("msg"), "hi", r)
        self.assertEqual(load.failures, [], "requests failed during the broken update")
        self.assertGreater(load.count, 0)

        self.deploy("fixed.lua:app")
        dep = self.server.wait_status(
            "hello", "Hello", lambda d: d["status"] == "HEALTHY" and len(running(d)) == 2 and
            not ({r["pid"] for r in running(d)} & v1), timeout=30, what="HEALTHY on v3")
        self.assertEqual(dep["message"], "", dep)
        self.assertEqual(self.app_status(), "RUNNING")
        self.assertEqual(self.server.get("/hello/x").json().get("version"), "v3")

    def test_update_in_progress_is_updating(self):
        self.server.wait_status("hello", "Hello", lambda d: d["status"] == "HEALTHY",
                                timeout=30, what="HEALTHY")
        self.deploy("broken.lua:app")
        dep = self.server.wait_status("hello", "Hello", lambda d: d["status"] != "HEALTHY",
                                      timeout=15, what="a status other than HEALTHY")
        # six constructor failures with backoff take seconds: the update is seen first
        self.assertEqual(dep["status"], "UPDATING", dep)
        self.assertEqual(dep["status_trigger"], "CONFIG_UPDATE_STARTED", dep)
        self.deploy("hello.lua:app")
        self.server.wait_status("hello", "Hello", lambda d: d["status"] == "HEALTHY" and
                                len(running(d)) == 2, timeout=30, what="HEALTHY again")


if __name__ == "__main__":
    harness.main()
