"""Custom metrics in policy and router scripts (docs/metrics.md, "Custom metrics"): a router and
an autoscaling policy `require "moonserve.metrics"` (the engine's module, not the config
folder's), define a Counter, a Gauge and a Histogram, and /metrics exports them with the
deployment's labels and their tags, in a form promtool accepts. A script that defines none adds
nothing."""

import unittest

import harness
from harness import assert_promtool_accepts, hello_app, start_server, wait_until

POLICY = '''local metrics = require "moonserve.metrics"
local decided = metrics.Gauge { name = "policy_decided_replicas",
                                description = "What the policy answered last." }
local calls = metrics.Counter { name = "policy_calls", description = "Policy calls.",
                                tag_keys = { "scope" } }
return { policy = function(ctx)
  calls:inc(1, { scope = "deployment" })
  decided:set(2)
  return 2, ctx.policy_state
end }
'''

ROUTER = '''local metrics = require "moonserve.metrics"
local picks = metrics.Counter { name = "router_picks", description = "Requests routed.",
                                tag_keys = { "rank" } }
local sizes = metrics.Histogram { name = "router_candidates", description = "Candidates seen.",
                                  boundaries = { 1, 2, 4 } }
local R = {}
function R:choose_replicas(candidates)
  picks:inc(1, { rank = "1" })
  sizes:observe(#candidates)
  return { candidates }
end
return { Router = R }
'''

# A module of the same name in the config's folder must not shadow the engine's.
SHADOW = 'error("the config folder copy of moonserve/metrics.lua was loaded")\n'


def app():
    return hello_app("pm", "/pm", {
        "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 30, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5,
            "policy": {"policy_function": "policy.lua:policy"}},
        "request_router_config": {"request_router_class": "router.lua:Router"},
    })


def samples(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class PolicyMetricsTest(unittest.TestCase):

    def test_router_and_policy_metrics_are_exported(self):
        srv = start_server(self, [app()], extra_config={"control_loop": {"interval_s": 0.05}},
                           files={"policy.lua": POLICY, "router.lua": ROUTER,
                                  "moonserve/metrics.lua": SHADOW})
        for _ in range(5):
            self.assertEqual(srv.get("/pm/x").status, 200)
        labels = 'application="pm",deployment="Hello"'

        def scraped():
            text = srv.admin_request("GET", "/metrics").text
            s = samples(text)
            return s.get('policy_calls_total{%s,scope="deployment"}' % labels, 0) > 0 and text

        text = wait_until(scraped, 10)
        self.assertTrue(text, "policy metrics never appeared")
        s = samples(text)
        self.assertEqual(s['router_picks_total{%s,rank="1"}' % labels], 5, text)
        self.assertEqual(s['policy_decided_replicas{%s}' % labels], 2)
        self.assertEqual(s['router_candidates_count{%s}' % labels], 5)
        self.assertEqual(s['router_candidates_bucket{%s,le="+Inf"}' % labels], 5)
        self.assertIn("# TYPE router_candidates histogram", text)
        self.assertIn("# HELP router_picks_total Requests routed.", text)
        dep = srv.deployment_status("pm", "Hello")
        self.assertEqual(dep["router"]["failures"], 0, dep)
        self.assertEqual(dep["autoscaling"]["policy"]["failures"], 0, dep)
        assert_promtool_accepts(self, text)

    def test_scripts_without_metrics_add_nothing(self):
        srv = start_server(self, [hello_app("plain", "/plain")])
        self.assertEqual(srv.get("/plain/x").status, 200)
        text = srv.admin_request("GET", "/metrics").text
        others = [n for n in samples(text) if not n.startswith("moonserve_")]
        self.assertEqual(others, [], "families nobody defined")


if __name__ == "__main__":
    harness.main()
