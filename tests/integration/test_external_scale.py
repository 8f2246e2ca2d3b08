"""External scaling API (POST /api/v1/applications/{app}/deployments/{dep}/scale on the admin
port), as Ray Serve: with external_scaler_enabled the replica count follows the requests (to N,
to 0 and back; a request arriving at 0 is held and served once the count goes back up);
412 when the application does not enable it; 400 for an unknown application or deployment and
for a bad body; the status document shows target_num_replicas and the replicas."""

import threading
import time
import unittest

import harness
from harness import hello_app

CONTROL = {"control_loop": {"interval_s": 0.05}}


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class ExternalScaleTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    APPLICATIONS = [
        dict(hello_app("ext", "/ext", {"num_replicas": 1, "graceful_shutdown_timeout_s": 2,
                                       "graceful_shutdown_wait_loop_s": 0.2}),
             external_scaler_enabled=True),
        dict(hello_app("fixed", "/fixed", {"num_replicas": 1}), external_scaler_enabled=False),
        hello_app("plain", "/plain", {"num_replicas": 1}),
    ]

    def wait_running(self, n, timeout=10):
        return self.server.wait_status("ext", "Hello", lambda d: d.get("target_num_replicas") == n
                                       and len(running(d)) == n, timeout=timeout,
                                       what="%d running replicas" % n)

    def test_1_scale_up_down_zero_and_back(self):
        srv = self.server
        self.wait_running(1)
        app = srv.status()["applications"]["ext"]
        self.assertIs(app.get("external_scaler_enabled"), True, app)

        r = srv.scale("ext", "Hello", 3)
        self.assertEqual(r.status, 200, r)
        self.assertIn("message", r.json())
        dep = self.wait_running(3)
        self.assertEqual(len({x.get("pid") for x in running(dep)}), 3, dep)
        srv.wait_serving_replicas("/ext/w", 3)

        # idempotent
        self.assertEqual(srv.scale("ext", "Hello", 3).status, 200)
        self.assertEqual(srv.scale("ext", "Hello", 2).status, 200)
        self.wait_running(2)

        self.assertEqual(srv.scale("ext", "Hello", 0).status, 200)
        self.wait_running(0)
        # the other applications are untouched
        self.assertEqual(len(running(srv.deployment_status("fixed", "Hello"))), 1)
        self.assertEqual(srv.get("/fixed/x").status, 200)

        # a request at zero is held, and served once the deployment is scaled back up
        out = {}

        def call():
            t = time.monotonic()
            try:
                out["r"] = srv.get("/ext/held", timeout=20)
            except Exception as e:  # noqa
                out["e"] = e
            out["t"] = time.monotonic() - t
        th = threading.Thread(target=call, daemon=True)
        th.start()
        time.sleep(0.5)
        self.assertTrue(th.is_alive(), "the request at zero replicas was not held: %r" % out)
        self.assertEqual(srv.scale("ext", "Hello", 1).status, 200)
        th.join(20)
        self.assertFalse(th.is_alive(), "held request never answered")
        self.assertNotIn("e", out)
        self.assertEqual(out["r"].status, 200, out["r"])
        self.assertGreaterEqual(out["t"], 0.45)
        self.wait_running(1)

    def test_disabled_is_412(self):
        for app in ("fixed", "plain"):
            r = self.server.scale(app, "Hello", 2)
            self.assertEqual(r.status, 412, r)
            self.assertIn("error", r.json())
        self.assertEqual(self.server.deployment_status("fixed", "Hello")
                         .get("target_num_replicas"), 1)

    def test_unknown_app_or_deployment_is_400(self):
        for app, dep in (("nope", "Hello"), ("ext", "Nope")):
            r = self.server.scale(app, dep, 1)
            self.assertEqual(r.status, 400, r)
            self.assertIn("error", r.json())

    def test_bad_body_is_400(self):
        bodies = ["not json", "{}", '{"target_num_replicas": -1}',
                  '{"target_num_replicas": "2"}', '{"target_num_replicas": 1.5}',
                  '{"target_num_replicas": null}', "[1]", ""]
        for b in bodies:
            r = self.server.scale("ext", "Hello", b)
            self.assertEqual(r.status, 400, "body %r: %r" % (b, r))
            self.assertIn("error", r.json(), b)


class ExternalScaleWithAutoscalingTest(unittest.TestCase):
    """Ray's schema rejects external_scaler_enabled together with autoscaling."""

    def test_rejected_by_check(self):
        srv = harness.Server([dict(hello_app("ext", "/ext", {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}),
            external_scaler_enabled=True)])
        self.addCleanup(srv.cleanup)
        rc, out = harness.run_cli("check", srv.config_path)
        self.assertEqual(rc, 1, out)
        self.assertRegex(out, r"config\.yaml:\d+:\d+: .*external_scaler_enabled")


if __name__ == "__main__":
    harness.main()
