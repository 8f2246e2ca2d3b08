"""max_replicas_total, the engine-wide replica limit: `moonserve check`, `run` and deploy refuse
a config whose counts pass it (num_replicas, autoscaling max_replicas, the counts the deployments
start with together; file:line:col errors), and at run time autoscaling decisions and
external_scaler ticks above what is left are cut to it, logged once per run of cuts."""

import os
import re
import subprocess
import tempfile
import textwrap
import unittest

import harness
from harness import hello_app, run_cli

ERR_RE = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$", re.M)

TICK_LUA = r'''
local M = {}
function M.tick(ctx) return { Hello = 5 } end  -- every tick: more than the limit leaves
return M
'''

GREEDY_POLICY = r'''
local M = {}
function M.policy(ctx) return 3 end  -- always the deployment's max_replicas
return M
'''


class CheckLimitTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="moonserve-limit-")
        self.addCleanup(self.tmp.cleanup)
        with open(os.path.join(self.tmp.name, "hello.lua"), "w") as f:
            f.write(harness.HELLO_LUA)

    def write(self, text):
        path = os.path.join(self.tmp.name, "config.yaml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
        return path

    def check(self, text):
        rc, out = run_cli("check", self.write(text), timeout=30)
        for m in harness.SANITIZER_MARKERS:
            self.assertNotIn(m, out)
        return rc, out

    def assert_error(self, text, line, pattern):
        rc, out = self.check(text)
        self.assertEqual(rc, 1, "check should fail:\n" + out)
        hit = [m for m in ERR_RE.finditer(out) if int(m.group("line")) == line and
               re.search(pattern, m.group("msg"))]
        self.assertTrue(hit, "no error at line %d matching %r in:\n%s" % (line, pattern, out))
        return out

    def test_num_replicas_over_the_limit(self):
        self.assert_error("""
            max_replicas_total: 3
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replicas: 4
            """, 7, r"deployment 'Hello' of application 'hello': num_replicas 4 is over the "
                    r"engine's replica limit, max_replicas_total 3")

    def test_autoscaling_max_over_the_limit(self):
        self.assert_error("""
            max_replicas_total: 3
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    autoscaling_config: {min_replicas: 1, max_replicas: 5}
            """, 7, r"autoscaling_config.max_replicas 5 is over the engine's replica limit, "
                    r"max_replicas_total 3")

    def test_code_count_over_the_limit_points_at_import_path(self):
        with open(os.path.join(self.tmp.name, "many.lua"), "w") as f:
            f.write(harness.HELLO_LUA.replace('serve.deployment { name = "Hello" }',
                                              'serve.deployment { name = "Hello", '
                                              'num_replicas = 9 }'))
        self.assert_error("""
            max_replicas_total: 3
            applications:
              - name: hello
                route_prefix: /hello
                import_path: many.lua:app
            """, 5, r"num_replicas 9 is over the engine's replica limit")

    def test_starting_counts_together_over_the_limit(self):
        text = """
            max_replicas_total: 3
            applications:
              - name: a
                route_prefix: /a
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replicas: 2
              - name: b
                route_prefix: /b
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    autoscaling_config: {min_replicas: 1, initial_replicas: 2, max_replicas: 3}
            """
        self.assert_error(text, 1, r"the deployments start with 4 replicas together .*"
                                   r"max_replicas_total 3")
        # `run` refuses it the same way, before starting anything
        p = subprocess.run([harness.BIN, "run", os.path.join(self.tmp.name, "config.yaml")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30,
                           stdin=subprocess.DEVNULL)
        out = p.stdout.decode("utf-8", "replace")
        self.assertNotEqual(p.returncode, 0, out)
        self.assertIn("the deployments start with 4 replicas together", out)

    def test_counts_within_the_limit_pass(self):
        rc, out = self.check("""
            max_replicas_total: 4
            applications:
              - name: a
                route_prefix: /a
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replicas: 2
              - name: b
                route_prefix: /b
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    autoscaling_config: {min_replicas: 1, initial_replicas: 2, max_replicas: 4}
            """)
        self.assertEqual(rc, 0, out)


class DeployLimitTest(harness.ServerTestCase):
    """A deploy is checked the same way: 400 with the error, nothing changes."""
    EXTRA_CONFIG = {"max_replicas_total": 3}
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 1})]

    def deploy(self, apps, **top):
        cfg = {"http_options": self.server.http_options,
               "admin": {"host": self.server.host, "port": self.server.admin_port},
               "applications": apps}
        cfg.update(top)
        return self.server.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)

    def test_deploy_over_the_limit_is_refused(self):
        r = self.deploy([hello_app("hello", "/hello", {"num_replicas": 4})],
                        max_replicas_total=3)
        self.assertEqual(r.status, 400, r)
        self.assertIn("num_replicas 4 is over the engine's replica limit, max_replicas_total 3",
                      r.text)
        self.assertEqual(self.server.deployment_status("hello", "Hello")["target_num_replicas"],
                         1)


def target(srv, app):
    return srv.deployment_status(app, "Hello")["target_num_replicas"]


class TickLimitTest(harness.ServerTestCase):
    """An external_scaler tick asking past the limit gets what is left, logged once."""
    EXTRA_CONFIG = {"max_replicas_total": 3, "control_loop": {"interval_s": 0.05}}
    FILES = {"tick.lua": TICK_LUA}
    APPLICATIONS = [
        hello_app("fixed", "/fixed", {"num_replicas": 1}),
        dict(hello_app("ticked", "/ticked", {"num_replicas": 1,
                                             "graceful_shutdown_wait_loop_s": 0.2,
                                             "graceful_shutdown_timeout_s": 2}),
             external_scaler_enabled=True,
             external_scaler={"tick": "tick.lua:tick", "tick_interval_s": 0.05}),
    ]

    def test_tick_is_cut_to_the_limit(self):
        srv = self.server
        srv.wait_status("ticked", "Hello", lambda d: d["target_num_replicas"] == 2, timeout=10,
                        what="target cut to 2")
        ticks = lambda: srv.status()["applications"]["ticked"]["external_scaler"]["ticks"]
        first = ticks()
        self.assertTrue(harness.wait_until(lambda: ticks() >= first + 10, timeout=10))
        self.assertEqual(target(srv, "ticked"), 2)
        self.assertEqual(target(srv, "fixed"), 1)
        line = ("external_scaler tick ticked/Hello: asked for 5 replicas, cut to 2: "
                "max_replicas_total is 3 and the other deployments keep 1")
        self.assertEqual(srv.stderr_text().count(line), 1, srv.stderr_tail())


class AutoscalingLimitTest(harness.ServerTestCase):
    """An autoscaling decision past the limit gets what is left, logged once."""
    EXTRA_CONFIG = {"max_replicas_total": 3, "control_loop": {"interval_s": 0.05}}
    FILES = {"greedy.lua": GREEDY_POLICY}
    APPLICATIONS = [
        hello_app("fixed", "/fixed", {"num_replicas": 2}),
        hello_app("auto", "/auto", {
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0,
                                   "metrics_interval_s": 0.1, "look_back_period_s": 0.5,
                                   "policy": {"policy_function": "greedy.lua:policy"}},
            "graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 2}),
    ]

    def test_autoscaling_is_cut_to_the_limit(self):
        srv = self.server
        line = ("autoscaling auto/Hello: asked for 3 replicas, cut to 1: max_replicas_total is 3 "
                "and the other deployments keep 2")
        self.assertTrue(harness.wait_until(lambda: line in srv.stderr_text(), timeout=10),
                        srv.stderr_tail())
        ticks = lambda: srv.status()["control_loop"]["ticks"]
        first = ticks()
        self.assertTrue(harness.wait_until(lambda: ticks() >= first + 10, timeout=10))
        self.assertEqual(target(srv, "auto"), 1)
        self.assertEqual(target(srv, "fixed"), 2)
        self.assertEqual(srv.stderr_text().count(line), 1, srv.stderr_tail())


if __name__ == "__main__":
    harness.main()
