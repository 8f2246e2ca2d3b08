"""The admin listener itself: the status document has Ray's shape (application and deployment
status, replicas with replica_id / state / pid / start_time_s matching the real child
processes), a bearer token is enforced when configured, wrong methods get 405, and `moonserve
status` / `moonserve scale` / `moonserve reload` work as its clients."""

import time
import unittest

import harness
from harness import hello_app, run_cli, start_server


class AdminStatusTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.05}}
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 2})]

    def test_status_document(self):
        srv = self.server
        srv.wait_replicas(2)
        dep = srv.wait_status("hello", "Hello", lambda d: len(
            [r for r in d.get("replicas") or [] if r.get("state") == "RUNNING"]) == 2,
            what="2 running")
        doc = srv.status()
        app = doc["applications"]["hello"]
        self.assertEqual(app.get("status"), "RUNNING", app)
        self.assertEqual(app.get("route_prefix"), "/hello", app)
        self.assertEqual(dep.get("status"), "HEALTHY", dep)
        self.assertEqual(dep.get("target_num_replicas"), 2, dep)
        pids = sorted(r["pid"] for r in dep["replicas"])
        self.assertEqual(pids, srv.replica_pids())
        for r in dep["replicas"]:
            self.assertTrue(r.get("replica_id"), r)
            self.assertIsInstance(r.get("start_time_s"), (int, float), r)
            self.assertLess(abs(r["start_time_s"] - time.time()), 600, r)
        # replica ids are the ones requests report
        seen = srv.wait_serving_replicas("/hello/w", 2)
        self.assertEqual(seen, {r["replica_id"] for r in dep["replicas"]})

    def test_wrong_method(self):
        r = self.server.admin_request("GET", "/api/v1/reload")
        self.assertEqual(r.status, 405, r)
        r = self.server.admin_request("GET", "/api/v1/applications/hello/deployments/Hello/scale")
        self.assertEqual(r.status, 405, r)

    def test_unknown_path_is_404_json(self):
        r = self.server.admin_request("GET", "/api/nope")
        self.assertEqual(r.status, 404, r)
        self.assertIsInstance(r.json(), dict)

    def test_cli_status(self):
        rc, out = run_cli("status", "--address", "http://127.0.0.1:%d" % self.server.admin_port,
                          timeout=15)
        self.assertEqual(rc, 0, out)
        self.assertIn("hello", out)

    def test_cli_reload(self):
        rc, out = run_cli("reload", "--address", "http://127.0.0.1:%d" % self.server.admin_port,
                          timeout=15)
        self.assertEqual(rc, 0, out)


class AdminTokenTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"admin": {"token": "s3cret-token"}}
    APPLICATIONS = [hello_app("hello", "/hello")]

    def test_token_required(self):
        srv = self.server
        r = self._no_auth("GET", "/api/serve/applications/")
        self.assertEqual(r.status, 401, r)
        r = srv.admin_request("GET", "/api/serve/applications/", token="wrong")
        self.assertEqual(r.status, 401, r)
        r = self._no_auth("POST", "/api/v1/reload")
        self.assertEqual(r.status, 401, r)
        self.assertIn("applications", srv.status())

    def _no_auth(self, method, path):
        saved = self.server.admin_token
        self.server.admin_token = None
        try:
            return self.server.admin_request(method, path)
        finally:
            self.server.admin_token = saved

    def test_cli_with_token(self):
        addr = "http://127.0.0.1:%d" % self.server.admin_port
        rc, out = run_cli("status", "--address", addr, "--token", "s3cret-token", timeout=15)
        self.assertEqual(rc, 0, out)
        rc, out = run_cli("status", "--address", addr, timeout=15)
        self.assertNotEqual(rc, 0, out)


if __name__ == "__main__":
    harness.main()
