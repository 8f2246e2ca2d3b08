"""Policy scripts `require` Lua modules from the config's folder (issue 7 point 5): an autoscaling
policy and a router share `lib/shared.lua`, each loaded inside its own sandbox; the module's
answer drives the autoscaler and the router; a missing module fails `moonserve check` with the
policy's file:line, and a reload that breaks the shared module is rejected with the old versions
kept."""

import os
import re
import unittest

import harness
from harness import hello_app, run_cli, start_server

SHARED = '''local M = { loads = 0 }
M.loads = M.loads + 1
function M.target() return 2 end
function M.first(candidates) return { candidates[1] } end
return M
'''

POLICY = '''local shared = require "lib.shared"
return { policy = function(ctx)
  assert(shared.loads == 1, "the module ran once per state")
  return shared.target(), ctx.policy_state
end }
'''

ROUTER = '''local shared = require "lib.shared"
local R = {}
function R:choose_replicas(candidates) return shared.first(candidates) end
return { Router = R }
'''

MISSING = '''local nope = require "lib.nope"
return { policy = function(ctx) return 1 end }
'''


def app():
    return hello_app("req", "/req", {
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 30, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5,
            "policy": {"policy_function": "policy.lua:policy"}},
        "request_router_config": {"request_router_class": "router.lua:Router"},
    })


class PolicyRequireTest(unittest.TestCase):

    def test_policy_and_router_share_a_module(self):
        srv = start_server(self, [app()], extra_config={"control_loop": {"interval_s": 0.05}},
                           files={"lib/shared.lua": SHARED, "policy.lua": POLICY,
                                  "router.lua": ROUTER})
        dep = srv.wait_status("req", "Hello", lambda d: d.get("target_num_replicas") == 2,
                              timeout=10, what="target 2 from the required module")
        self.assertEqual(dep["autoscaling"]["policy"]["failures"], 0, dep)
        self.assertEqual(srv.get("/req/x").status, 200)
        self.assertEqual(srv.deployment_status("req", "Hello")["router"]["failures"], 0)

        # a broken shared module fails both scripts' reload: nothing changes
        srv.write_file("lib/shared.lua", "return {")
        code, body = srv.reload()
        self.assertEqual(code, 422, body)
        errors = [s.get("error") or "" for s in body["scripts"] if not s.get("ok")]
        self.assertTrue(any("shared.lua" in e for e in errors), body)
        dep = srv.deployment_status("req", "Hello")
        self.assertEqual(dep["router"]["version"], 1, dep)
        self.assertEqual(srv.get("/req/y").status, 200)

    def test_missing_module_fails_check(self):
        srv_dir = harness.tempfile.TemporaryDirectory(prefix="moonserve-req-")
        self.addCleanup(srv_dir.cleanup)
        d = srv_dir.name
        for name, text in (("hello.lua", harness.HELLO_LUA), ("policy.lua", MISSING)):
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        path = os.path.join(d, "config.yaml")
        with open(path, "w") as f:
            f.write(harness.to_yaml({"applications": [hello_app("req", "/req", {
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                       "policy": {"policy_function": "policy.lua:policy"}}})]}))
        rc, out = run_cli("check", path, timeout=30)
        self.assertEqual(rc, 1, out)
        self.assertRegex(out, r"policy\.lua:1:.*module 'lib\.nope' not found")


if __name__ == "__main__":
    harness.main()
