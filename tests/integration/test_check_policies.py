"""`moonserve check` on the control-plane keys: a config using every autoscaling_config field,
num_replicas: auto, request_router_config, application autoscaling_policy,
external_scaler_enabled, control_loop and admin passes; Ray Serve's validation rules fail with
`file:line:col: message` (min > max, initial outside the bounds, an int num_replicas together with
autoscaling_config, a bad aggregation_function, unknown keys with a did-you-mean, a missing or
broken policy / router file, a missing function in it, a bad control_loop interval)."""

import os
import re
import tempfile
import textwrap
import unittest

import harness
from harness import run_cli

ERR_RE = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$", re.M)

POLICY = '''local M = {}
function M.policy(ctx) return ctx.target_num_replicas, ctx.policy_state end
function M.app_policy(ctxs)
  local out = {}
  for k, ctx in pairs(ctxs) do out[k] = ctx.target_num_replicas end
  return out, {}
end
return M
'''

ROUTER = '''local R = {}
function R:choose_replicas(candidates, request) return { candidates } end
return { Router = R }
'''

GOOD = """
control_loop:
  interval_s: 0.05
admin:
  host: 127.0.0.1
  port: 18265
applications:
  - name: hello
    route_prefix: /hello
    import_path: hello.lua:app
    autoscaling_policy:
      policy_function: policy.lua:app_policy
    deployments:
      - name: Hello
        num_replicas: auto
        max_ongoing_requests: 4
        autoscaling_config:
          min_replicas: 0
          max_replicas: 5
          initial_replicas: 1
          target_ongoing_requests: 2
          upscale_delay_s: 0.5
          downscale_delay_s: 1
          downscale_to_zero_delay_s: 2
          look_back_period_s: 1
          aggregation_function: max
          upscaling_factor: 1.5
          downscaling_factor: 0.5
          metrics_interval_s: 0.5
          policy:
            policy_function: policy.lua:policy
            policy_kwargs: {k: 1}
            dry_run: true
        request_router_config:
          request_router_class: router.lua:Router
          request_router_kwargs: {header: x-session-id}
          request_routing_stats_period_s: 1
          request_routing_stats_timeout_s: 2
  - name: ext
    route_prefix: /ext
    import_path: hello.lua:app
    external_scaler_enabled: true
    deployments:
      - name: Hello
        num_replicas: 2
"""

# a deployment block; the autoscaling_config lines are substituted per case (indented 8)
BASE = """
applications:
  - name: hello
    route_prefix: /hello
    import_path: hello.lua:app
    deployments:
      - name: Hello
%s
"""


class CheckPoliciesTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="moonserve-checkp-")
        self.addCleanup(self.tmp.cleanup)
        for name, text in (("hello.lua", harness.HELLO_LUA), ("policy.lua", POLICY),
                           ("router.lua", ROUTER)):
            with open(os.path.join(self.tmp.name, name), "w") as f:
                f.write(text)

    def write(self, name, text):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
        return path

    def check(self, path):
        rc, out = run_cli("check", path, timeout=30)
        for m in harness.SANITIZER_MARKERS:
            self.assertNotIn(m, out)
        return rc, out

    def assert_error(self, body, line, pattern, col=None):
        path = self.write("config.yaml", BASE % textwrap.indent(textwrap.dedent(body).strip("\n"),
                                                                " " * 8))
        with open(path) as f:
            text = f.read()
        rc, out = self.check(path)
        self.assertEqual(rc, 1, "check should fail:\n%s\n--- config:\n%s" % (out, text))
        lines = line if isinstance(line, tuple) else (line,)
        hits = [m for m in ERR_RE.finditer(out) if int(m.group("line")) in lines and
                (col is None or int(m.group("col")) == col)]
        self.assertTrue(hits, "no error at line %r in:\n%s\n--- config:\n%s"
                        % (line, out, text))
        self.assertRegex(hits[0].group("msg"), pattern)
        return out

    def test_every_field_passes(self):
        rc, out = self.check(self.write("config.yaml", GOOD))
        self.assertEqual(rc, 0, out)

    def test_min_above_max(self):
        self.assert_error("""
            autoscaling_config:
              min_replicas: 3
              max_replicas: 2
            """, (7, 8, 9), r"(?i)min_replicas|max_replicas")

    def test_initial_outside_bounds(self):
        self.assert_error("""
            autoscaling_config:
              min_replicas: 1
              max_replicas: 2
              initial_replicas: 5
            """, (7, 10), r"initial_replicas")

    def test_int_num_replicas_with_autoscaling(self):
        self.assert_error("""
            num_replicas: 2
            autoscaling_config:
              max_replicas: 2
            """, (7, 8), r"num_replicas|autoscaling_config")

    def test_bad_aggregation_function(self):
        self.assert_error("""
            autoscaling_config:
              aggregation_function: median
            """, 8, r"aggregation_function")

    def test_negative_delay(self):
        self.assert_error("""
            autoscaling_config:
              upscale_delay_s: -1
            """, 8, r"upscale_delay_s")

    def test_zero_target_ongoing_requests(self):
        self.assert_error("""
            autoscaling_config:
              target_ongoing_requests: 0
            """, 8, r"target_ongoing_requests")

    def test_unknown_autoscaling_key_did_you_mean(self):
        out = self.assert_error("""
            autoscaling_config:
              max_replica: 2
            """, 8, r"max_replica")
        self.assertRegex(out.lower(), r"did you mean.*max_replicas")

    def test_unknown_router_key_did_you_mean(self):
        out = self.assert_error("""
            request_router_config:
              request_router_clas: router.lua:Router
            """, 8, r"request_router_clas")
        self.assertRegex(out.lower(), r"did you mean.*request_router_class")

    def test_missing_policy_file(self):
        self.assert_error("""
            autoscaling_config:
              policy:
                policy_function: nope.lua:policy
            """, 9, r"nope\.lua")

    def test_missing_policy_function(self):
        self.assert_error("""
            autoscaling_config:
              policy:
                policy_function: policy.lua:not_there
            """, 9, r"not_there")

    def test_broken_router_file(self):
        with open(os.path.join(self.tmp.name, "broken.lua"), "w") as f:
            f.write("local R = {}\nfunction R:choose_replicas(c)\n  return = 1\nend\nreturn R\n")
        out = self.assert_error("""
            request_router_config:
              request_router_class: broken.lua:Router
            """, 8, r"broken\.lua")
        self.assertIn("broken.lua:3:", out)

    def test_bad_control_loop_interval(self):
        path = self.write("config.yaml", """
            control_loop:
              interval_s: -1
            applications: []
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 1, out)
        self.assertRegex(out, r"config\.yaml:2:\d+: .*interval_s")

    def test_unknown_control_loop_key(self):
        path = self.write("config.yaml", """
            control_loop:
              interval: 1
            applications: []
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 1, out)
        self.assertRegex(out, r"config\.yaml:2:\d+: .*interval")


if __name__ == "__main__":
    harness.main()
