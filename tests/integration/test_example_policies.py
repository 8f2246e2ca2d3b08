"""The example policies in examples/policies/ run for real (referenced by absolute path, with the
kwargs their headers document): the coordinated application-level policy keeps Model at twice
the Preprocessor (idle and under load), the scheduled policy holds business_replicas during
business hours (0-24 here), the custom-metrics policy scales on the replicas' reported
cpu_usage. `moonserve check` passes on a config naming all three."""

import os
import time
import unittest

import harness
from harness import LoadGen, run_cli

EXAMPLES = os.path.join(harness.SOURCE_DIR, "examples", "policies")
CONTROL = {"control_loop": {"interval_s": 0.05}}

PIPELINE_LUA = r'''
local serve = require "moonserve"
local Model = serve.deployment { name = "Model" }
function Model:__call(req) return { ok = true } end
local Preprocessor = serve.deployment { name = "Preprocessor" }
function Preprocessor:init(model) self.model = model end
function Preprocessor:__call(req)
  local s = tonumber(req.query.sleep or "0")
  serve.sleep(s)
  return self.model:remote({ sleep = 0 }):result()
end
return { app = Preprocessor:bind(Model:bind()) }
'''

CPU_LUA = r'''
local serve = require "moonserve"
local Busy = serve.deployment { name = "Busy" }
function Busy:__call(req) return "ok" end
function Busy:record_autoscaling_stats() return { cpu_usage = 120 } end
return { app = Busy:bind() }
'''


def ex(name):
    return os.path.join(EXAMPLES, name)


def as_cfg(**kw):
    cfg = {"min_replicas": 1, "upscale_delay_s": 0, "downscale_delay_s": 30,
           "metrics_interval_s": 0.1, "look_back_period_s": 0.5}
    cfg.update(kw)
    return cfg


APPS = [
    {"name": "pipe", "route_prefix": "/pipe", "import_path": "pipeline.lua:app",
     "autoscaling_policy": {"policy_function": ex("coordinated.lua") +
                            ":coordinated_scaling_policy",
                            "policy_kwargs": {"requests_per_replica": 2}},
     "deployments": [
         {"name": "Preprocessor", "graceful_shutdown_timeout_s": 2,
          "autoscaling_config": as_cfg(max_replicas=3)},
         {"name": "Model", "graceful_shutdown_timeout_s": 2,
          "autoscaling_config": as_cfg(max_replicas=6)}]},
    harness.hello_app("sched", "/sched", {"autoscaling_config": dict(
        as_cfg(max_replicas=3),
        policy={"policy_function": ex("scheduled.lua") + ":business_hours",
                "policy_kwargs": {"start_hour": 0, "end_hour": 24, "business_replicas": 2,
                                  "off_hours_replicas": 1}})}),
    {"name": "cpu", "route_prefix": "/cpu", "import_path": "cpu.lua:app",
     "deployments": [{"name": "Busy", "autoscaling_config": dict(
         as_cfg(max_replicas=3),
         policy={"policy_function": ex("custom_metrics.lua") + ":cpu_policy",
                 "policy_kwargs": {"metric": "cpu_usage", "target_usage": 60}})}]},
]


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def no_failures(testcase, dep):
    a = (dep.get("autoscaling") or {}).get("policy") or {}
    testcase.assertEqual(a.get("failures", 0), 0, a)
    testcase.assertFalse(a.get("last_error"), a)


class ExamplePoliciesTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"pipeline.lua": PIPELINE_LUA, "cpu.lua": CPU_LUA}
    APPLICATIONS = APPS

    def targets(self):
        doc = self.server.status()["applications"]["pipe"]["deployments"]
        return (doc["Preprocessor"].get("target_num_replicas"),
                doc["Model"].get("target_num_replicas"))

    def test_check_passes(self):
        rc, out = run_cli("check", self.server.config_path)
        self.assertEqual(rc, 0, out)

    def test_coordinated_idle(self):
        ok = harness.wait_until(lambda: self.targets() == (1, 2), 10)
        self.assertTrue(ok, "idle pipeline should be Preprocessor 1, Model 2: %r"
                        % (self.targets(),))
        self.server.wait_status("pipe", "Model", lambda d: len(running(d)) == 2,
                                what="2 Model replicas running")
        self.assertEqual(self.server.get("/pipe").status, 200)

    def test_coordinated_under_load(self):
        with LoadGen(self.server, "/pipe/load?sleep=0.3&w={i}", 6) as load:
            ok = harness.wait_until(lambda: (self.targets()[0] or 0) >= 2, 10)
            snap = self.targets()
        self.assertEqual(load.failures, [])
        self.assertTrue(ok, "Preprocessor never scaled under load: %r" % (snap,))
        self.assertEqual(snap[1], 2 * snap[0], "Model is not twice the Preprocessor: %r"
                         % (snap,))
        no_failures(self, self.server.deployment_status("pipe", "Model"))

    def test_scheduled_business_hours(self):
        dep = self.server.wait_status("sched", "Hello", lambda d: d.get("target_num_replicas") == 2
                                      and len(running(d)) == 2, timeout=10,
                                      what="business_replicas 2")
        no_failures(self, dep)
        time.sleep(0.5)
        self.assertEqual(self.server.deployment_status("sched", "Hello")
                         .get("target_num_replicas"), 2)

    def test_custom_metrics(self):
        dep = self.server.wait_status("cpu", "Busy", lambda d: d.get("target_num_replicas") == 3
                                      and len(running(d)) == 3, timeout=15,
                                      what="cpu_usage 120 of 60 -> scale to max 3")
        no_failures(self, dep)


if __name__ == "__main__":
    harness.main()
