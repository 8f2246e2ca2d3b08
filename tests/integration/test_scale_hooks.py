"""External-scaling hooks in Lua (applications[].external_scaler): the judge accepts, clamps
(200 with the clamped count applied) or refuses (422 with the reason) each POST .../scale
request; a hook that fails lets the request through; the tick sets targets from an outside
signal; hook scripts are hot-reloaded with every other policy script and show in status."""

import harness
from harness import hello_app

HOOKS_V1 = r'''
local M = {}
function M.judge(req, kwargs)
  if req.target_num_replicas == 0 then
    return "refuse", req.deployment .. " must keep a replica"
  end
  if req.target_num_replicas == 3 and kwargs.fail_on_3 then error("judge blew up") end
  if req.target_num_replicas > kwargs.max then
    return "clamp", kwargs.max, "at most " .. kwargs.max
  end
  return "accept"
end
function M.tick(ctx, kwargs)
  -- once: the schedule asks for two replicas of Hello, then leaves the count alone
  if ctx.state.done then return nil end
  return { Hello = 2 }, { done = true }
end
return M
'''

HOOKS_V2 = HOOKS_V1.replace('"at most "', '"capped at "')


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class ScaleHooksTest(harness.ServerTestCase):
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.05}}
    FILES = {"hooks.lua": HOOKS_V1}
    APPLICATIONS = [
        dict(hello_app("judged", "/judged", {"num_replicas": 1,
                                             "graceful_shutdown_wait_loop_s": 0.2,
                                             "graceful_shutdown_timeout_s": 2}),
             external_scaler_enabled=True,
             external_scaler={"hook": "hooks.lua:judge", "kwargs": {"max": 3,
                                                                    "fail_on_3": True}}),
        dict(hello_app("ticked", "/ticked", {"num_replicas": 1,
                                             "graceful_shutdown_wait_loop_s": 0.2,
                                             "graceful_shutdown_timeout_s": 2}),
             external_scaler_enabled=True,
             external_scaler={"tick": "hooks.lua:tick", "tick_interval_s": 0.1,
                              "kwargs": {"max": 3}}),
    ]

    def wait_running(self, app, n):
        return self.server.wait_status(app, "Hello", lambda d: d.get("target_num_replicas") == n
                                       and len(running(d)) == n, timeout=10,
                                       what="%d running replicas" % n)

    def test_1_accept_clamp_refuse(self):
        srv = self.server
        r = srv.scale("judged", "Hello", 2)
        self.assertEqual(r.status, 200, r)
        self.wait_running("judged", 2)

        r = srv.scale("judged", "Hello", 10)
        self.assertEqual(r.status, 200, r)
        self.wait_running("judged", 3)
        self.assertIn("clamped to 3", srv.stderr_text())

        r = srv.scale("judged", "Hello", 0)
        self.assertErrorJSON(r, 422)
        self.assertIn("Hello must keep a replica", r.json()["error"])
        self.assertEqual(srv.deployment_status("judged", "Hello")["target_num_replicas"], 3)

    def test_2_failing_hook_lets_the_request_through(self):
        srv = self.server
        failures = srv.status()["applications"]["judged"]["external_scaler"]["hook"]["failures"]
        r = srv.scale("judged", "Hello", 3)  # the judge raises for 3
        self.assertEqual(r.status, 200, r)
        self.wait_running("judged", 3)
        hook = srv.status()["applications"]["judged"]["external_scaler"]["hook"]
        self.assertEqual(hook.get("failures"), failures + 1, hook)
        self.assertIn("judge blew up", hook.get("last_error") or "", hook)
        self.assertEqual(srv.scale("judged", "Hello", 1).status, 200)
        self.wait_running("judged", 1)

    def test_3_tick_sets_targets(self):
        self.wait_running("ticked", 2)
        # the tick ran once only: an external request afterwards stands
        self.assertEqual(self.server.scale("ticked", "Hello", 1).status, 200)
        self.wait_running("ticked", 1)

    def test_4_reload_and_status(self):
        srv = self.server
        before = srv.status()["applications"]["judged"].get("external_scaler")
        self.assertTrue(before, "no external_scaler in the application's status")
        srv.write_file("hooks.lua", HOOKS_V2)
        code, body = srv.reload()
        self.assertEqual(code, 200, body)
        kinds = [s for s in body["scripts"] if s.get("kind") == "scale_hook"]
        self.assertTrue(kinds, body)
        self.assertTrue(all(s.get("ok") for s in kinds), body)
        r = srv.scale("judged", "Hello", 9)
        self.assertEqual(r.status, 200, r)
        self.wait_running("judged", 3)
        self.assertIn("capped at 3", srv.stderr_text())

        srv.write_file("hooks.lua", "local M = {}\nfunction M.judge(\nreturn M\n")
        code, body = srv.reload()
        self.assertEqual(code, 422, body)
        self.assertFalse(body["ok"], body)
        # the old version still judges
        self.assertEqual(srv.scale("judged", "Hello", 0).status, 422)


if __name__ == "__main__":
    harness.main()
