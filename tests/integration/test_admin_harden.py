"""Admin API hardening (issue 8 point 8), on a live engine:

* scale requests are capped by max_replicas_total (400 naming the limit, nothing started), and a
  large allowed scale-up starts its replicas in steps while the ingress keeps answering;
* a web page cannot drive the tokenless loopback listener: a foreign Host (DNS rebinding) or
  Origin gets 403, a state-changing request that is not JSON (or YAML for a deploy) gets 415,
  and the CLI (status, scale, reload, deploy) still works;
* a config nested 50,000 deep is refused at once, by PUT and by `moonserve check`, while the
  engine keeps serving;
* an application name such as ../../x is refused.
"""

import http.client
import json
import os
import threading
import time
import unittest

import harness
from harness import hello_app, run_cli, start_server, wait_until

LIMIT = 250


def raw_admin(srv, method, path, body=None, headers=None, timeout=10.0):
    """An admin request with exactly the headers given (Host included, when given)."""
    conn = http.client.HTTPConnection(srv.host, srv.admin_port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, data
    finally:
        conn.close()


class HealthProbe(object):
    """Keeps asking the ingress for /-/healthz with a short deadline; records the slowest answer
    and every failure."""

    def __init__(self, srv, deadline_s):
        self.srv, self.deadline_s = srv, deadline_s
        self.failures, self.slowest, self.count = [], 0.0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.srv.request("GET", "/-/healthz", timeout=self.deadline_s)
                if r.status != 200:
                    self.failures.append("status %d" % r.status)
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
            self.slowest = max(self.slowest, time.monotonic() - t0)
            self.count += 1
            self._stop.wait(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


class ReplicaLimitTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"max_replicas_total": LIMIT, "control_loop": {"interval_s": 0.05}}
    APPLICATIONS = [dict(hello_app("ext", "/ext", {"num_replicas": 1}),
                         external_scaler_enabled=True)]

    def test_far_above_the_limit_is_400_and_starts_nothing(self):
        srv = self.server
        srv.wait_replicas(1)
        before = srv.replica_pids()
        r = srv.scale("ext", "Hello", 100000)
        body = self.assertErrorJSON(r, 400)
        self.assertIn("max_replicas_total is %d" % LIMIT, body["error"])
        self.assertIn("at most %d" % LIMIT, body["error"])
        r = srv.scale("ext", "Hello", LIMIT + 1)
        self.assertErrorJSON(r, 400)
        self.assertEqual(srv.deployment_status("ext", "Hello")["target_num_replicas"], 1)
        self.assertEqual(srv.replica_pids(), before)

    def test_large_scale_up_keeps_the_ingress_answering(self):
        srv = self.server
        srv.wait_replicas(1)
        n = 200
        t0 = time.monotonic()
        with HealthProbe(srv, 1.0) as probe:
            self.assertEqual(srv.scale("ext", "Hello", n).status, 200)
            srv.wait_status("ext", "Hello", lambda d: len(
                [x for x in d.get("replicas") or [] if x.get("state") == "RUNNING"]) == n,
                timeout=120, what="%d running" % n)
            took = time.monotonic() - t0
        self.assertEqual(probe.failures, [], "healthz failed during the scale-up")
        print("healthz: %d probes, slowest %.3f s, %.1f s to start %d" % (
            probe.count, probe.slowest, took, n))
        self.assertGreater(probe.count, 0)
        self.assertEqual(srv.scale("ext", "Hello", 1).status, 200)
        srv.wait_replicas(1, timeout=60)


class CrossSiteTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.05}}
    APPLICATIONS = [dict(hello_app("ext", "/ext", {"num_replicas": 1}),
                         external_scaler_enabled=True)]
    SCALE = "/api/v1/applications/ext/deployments/Hello/scale"

    def own(self):
        return "127.0.0.1:%d" % self.server.admin_port

    def test_text_plain_post_with_foreign_origin_is_refused(self):
        srv = self.server
        body = json.dumps({"target_num_replicas": 3})
        st, data = raw_admin(srv, "POST", self.SCALE, body,
                             {"Content-Type": "text/plain", "Origin": "http://evil.example"})
        self.assertEqual(st, 403, data)
        self.assertIn("Origin", json.loads(data)["error"])
        self.assertIn("request_id", json.loads(data))
        st, data = raw_admin(srv, "POST", "/api/v1/reload", "x",
                             {"Content-Type": "text/plain", "Origin": "null"})
        self.assertEqual(st, 403, data)
        # Without an Origin, a form's content types are still refused.
        for ct in ("text/plain", "application/x-www-form-urlencoded",
                   "multipart/form-data; boundary=x", "text/plain; a=application/json"):
            st, data = raw_admin(srv, "POST", self.SCALE, body, {"Content-Type": ct})
            self.assertEqual(st, 415, (ct, data))
            self.assertIn("application/json", json.loads(data)["error"])
        st, data = raw_admin(srv, "POST", self.SCALE, body)
        self.assertEqual(st, 415, data)
        self.assertEqual(srv.deployment_status("ext", "Hello")["target_num_replicas"], 1)

    def test_reload_accepts_no_body_or_json_only(self):
        srv = self.server
        self.assertEqual(raw_admin(srv, "POST", "/api/v1/reload", None)[0], 200)
        self.assertEqual(raw_admin(srv, "POST", "/api/v1/reload", "",
                                   {"Content-Type": "application/json"})[0], 200)
        self.assertEqual(raw_admin(srv, "POST", "/api/v1/reload", "",
                                   {"Content-Type": "text/plain"})[0], 415)
        # The listener's own origin is fine.
        self.assertEqual(raw_admin(srv, "POST", "/api/v1/reload", None,
                                   {"Origin": "http://" + self.own()})[0], 200)

    def test_foreign_host_is_refused(self):
        srv = self.server
        port = srv.admin_port
        for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1:%d" % (port + 1),
                     "127.0.0.1.evil.example:%d" % port):
            st, data = raw_admin(srv, "GET", "/api/serve/applications/", None, {"Host": host})
            self.assertEqual(st, 403, (host, data))
            self.assertIn("allowed_hosts", json.loads(data)["error"])
        st, _ = raw_admin(srv, "POST", "/api/v1/reload", None,
                          {"Host": "evil.example:%d" % port,
                           "Origin": "http://evil.example:%d" % port})
        self.assertEqual(st, 403)
        for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LOCALHOST:%d" % port,
                     "[::1]:%d" % port):
            st, data = raw_admin(srv, "GET", "/api/serve/applications/", None, {"Host": host})
            self.assertEqual(st, 200, (host, data))

    def test_put_needs_json_or_yaml(self):
        srv = self.server
        cfg = {"applications": [dict(hello_app("ext", "/ext", {"num_replicas": 1}),
                                     external_scaler_enabled=True)]}
        st, data = raw_admin(srv, "PUT", "/api/serve/applications/", json.dumps(cfg),
                             {"Content-Type": "text/plain"})
        self.assertEqual(st, 415, data)
        self.assertIn("application/yaml", json.loads(data)["error"])
        st, data = raw_admin(srv, "PUT", "/api/serve/applications/", json.dumps(cfg),
                             {"Content-Type": "application/yaml"}, timeout=30)
        self.assertEqual(st, 200, data)

    def test_cli_still_works(self):
        srv = self.server
        addr = "http://127.0.0.1:%d" % srv.admin_port
        rc, out = run_cli("status", "--address", addr, timeout=15)
        self.assertEqual(rc, 0, out)
        rc, out = run_cli("reload", "--address", addr, timeout=15)
        self.assertEqual(rc, 0, out)
        rc, out = run_cli("scale", "ext", "Hello", "1", "--address", addr, timeout=15)
        self.assertEqual(rc, 0, out)
        rc, out = run_cli("deploy", srv.config_path, "--address", addr, timeout=30)
        self.assertEqual(rc, 0, out)
        rc, out = run_cli("status", "--address", "http://localhost:%d" % srv.admin_port,
                          timeout=15)
        self.assertEqual(rc, 0, out)


class AllowedHostsTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"admin": {"allowed_hosts": ["serve.internal", "proxy.example:9000"]}}
    APPLICATIONS = [hello_app("hello", "/hello")]

    def test_configured_hosts_are_accepted(self):
        srv = self.server
        for host, want in (("serve.internal", 200), ("SERVE.internal:1234", 200),
                           ("proxy.example:9000", 200), ("proxy.example:9001", 403),
                           ("other.internal", 403), ("127.0.0.1:%d" % srv.admin_port, 200)):
            st, data = raw_admin(srv, "GET", "/api/serve/applications/", None, {"Host": host})
            self.assertEqual(st, want, (host, data))
        # Origin must still be the origin of the Host the request names.
        st, _ = raw_admin(srv, "GET", "/api/serve/applications/", None,
                          {"Host": "serve.internal", "Origin": "http://serve.internal"})
        self.assertEqual(st, 200)
        st, _ = raw_admin(srv, "GET", "/api/serve/applications/", None,
                          {"Host": "serve.internal", "Origin": "http://proxy.example:9000"})
        self.assertEqual(st, 403)

    def test_bad_allowed_hosts_is_a_config_error(self):
        path = os.path.join(self.server.dir, "bad-hosts.yaml")
        with open(path, "w") as f:
            f.write("admin:\n  allowed_hosts: 'x'\napplications: []\n")
        rc, out = run_cli("check", path)
        self.assertEqual(rc, 1, out)
        self.assertIn("allowed_hosts", out)


def nested(depth):
    return "[" * depth + "]" * depth


class NestingTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello")]

    def test_deep_config_is_refused_fast_while_serving(self):
        srv = self.server
        depth = 50000
        doc = '{"applications": [], "x": %s}' % nested(depth)
        self.assertGreaterEqual(len(doc), 100000)
        results = []

        def put():
            t0 = time.monotonic()
            st, data = raw_admin(srv, "PUT", "/api/serve/applications/", doc,
                                 {"Content-Type": "application/json"}, timeout=30)
            results.append((st, data, time.monotonic() - t0))

        with HealthProbe(srv, 1.0) as probe:
            t = threading.Thread(target=put)
            t.start()
            t.join(30)
        self.assertTrue(results, "the PUT did not finish")
        st, data, took = results[0]
        self.assertEqual(st, 400, data[:500])
        self.assertIn("deeper than 100 levels", data.decode())
        self.assertLess(took, 2.0)
        self.assertEqual(probe.failures, [])
        # YAML block and flow styles are bounded the same way.
        for text in ("applications: []\nx:\n" + "- " * 20000 + "1\n",
                     "applications: []\nx: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n"):
            t0 = time.monotonic()
            st, data = raw_admin(srv, "PUT", "/api/serve/applications/", text,
                                 {"Content-Type": "application/yaml"}, timeout=30)
            self.assertEqual(st, 400, data[:500])
            self.assertIn("deeper than 100 levels", data.decode())
            self.assertLess(time.monotonic() - t0, 2.0)
        # Nesting within the bound still loads (user_config, 50 levels).
        cfg = {"applications": [hello_app("hello", "/hello", {
            "user_config": json.loads('{"a": %s}' % nested(50))})]}
        st, data = raw_admin(srv, "PUT", "/api/serve/applications/", json.dumps(cfg),
                             {"Content-Type": "application/json"}, timeout=30)
        self.assertEqual(st, 200, data[:500])

    def test_check_refuses_a_deep_config(self):
        path = os.path.join(self.server.dir, "deep.json")
        with open(path, "w") as f:
            f.write('{"applications": [], "x": %s}' % nested(50000))
        t0 = time.monotonic()
        rc, out = run_cli("check", path)
        self.assertEqual(rc, 1, out)
        self.assertIn("deeper than 100 levels", out)
        self.assertLess(time.monotonic() - t0, 2.0)


class AppNameTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello")]

    def test_path_like_names_are_refused(self):
        srv = self.server
        for name in ("../../x", "a/b", "..", ".", "x" * 256):
            cfg = {"applications": [hello_app(name, "/n")]}
            st, data = raw_admin(srv, "PUT", "/api/serve/applications/", json.dumps(cfg),
                                 {"Content-Type": "application/json"}, timeout=30)
            self.assertEqual(st, 400, (name, data))
            self.assertIn("application name", data.decode())
        cfg = {"applications": [hello_app("hello", "/hello", {"name": "../D"})]}
        st, data = raw_admin(srv, "PUT", "/api/serve/applications/", json.dumps(cfg),
                             {"Content-Type": "application/json"}, timeout=30)
        self.assertEqual(st, 400, data)
        self.assertIn("deployment name", data.decode())
        path = os.path.join(srv.dir, "badname.yaml")
        with open(path, "w") as f:
            f.write("applications:\n- name: ../../x\n  import_path: hello.lua:app\n")
        rc, out = run_cli("check", path)
        self.assertEqual(rc, 1, out)
        self.assertIn("must not contain '/'", out)


if __name__ == "__main__":
    harness.main()
