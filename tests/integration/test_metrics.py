"""GET /metrics on the admin listener (docs/metrics.md): HTTP request counters and latency
histograms per route and status class, errors apart, disconnections counted as such, requests no
route took under route "", label values bounded by the config whatever paths clients send, and
the whole text accepted by Prometheus's own checker (`promtool check metrics`)."""

import re
import unittest

import harness
from harness import hello_app, start_server, wait_until

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{(name, ((label, value), ...)): float} for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        labels = tuple(sorted(LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def key(name, **labels):
    return (name, tuple(sorted(labels.items())))


HELLO = dict(application="hello", deployment="Hello", route="/hello")
NONE = dict(application="", deployment="", route="")


SPIN_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  while true do end
end
return { Router = R }
'''


class ScriptMetricsTest(unittest.TestCase):
    """A router script's overruns, reloads and memory reach /metrics."""

    def test_overruns_reloads_and_memory(self):
        dep = {"num_replicas": 1, "request_router_config": {
            "request_router_class": "router.lua:Router"}}
        srv = start_server(self, [hello_app(deployment=dep)], files={"router.lua": SPIN_ROUTER})
        labels = dict(kind="router", application="hello", deployment="Hello")

        def value(name, **extra):
            want = dict(labels, **extra) if name.startswith("moonserve_script") else extra
            return parse(srv.admin_request("GET", "/metrics").body.decode()).get(
                key(name, **want), 0.0)
        for _ in range(2):
            self.assertEqual(srv.get("/hello/x").status, 200)  # the fallback serves it
        self.assertEqual(value("moonserve_script_budget_overruns_total"), 2)
        self.assertEqual(value("moonserve_script_failures_total"), 2)
        self.assertGreater(value("moonserve_script_memory_bytes"), 1000)
        srv.write_file("router.lua", "this is not lua")
        self.assertEqual(srv.reload()[0], 422)
        self.assertEqual(value("moonserve_script_reloads_total", result="failed"), 1)
        self.assertEqual(value("moonserve_script_reloads_total", result="ok"), 0)
        srv.write_file("router.lua", SPIN_ROUTER + "\n-- v2\n")
        self.assertEqual(srv.reload()[0], 200)
        self.assertEqual(value("moonserve_script_reloads_total", result="ok"), 1)
        self.assertTrue(wait_until(lambda: value("moonserve_controller_control_loops_total") > 0,
                                   10))
        text = srv.admin_request("GET", "/metrics").body.decode()
        self.assertRegex(text, r'moonserve_event_loop_idle_seconds_total [0-9.]+')
        harness.assert_promtool_accepts(self, text)


class AutoscalingMetricsTest(unittest.TestCase):
    def test_latest_decision_is_exported(self):
        dep = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
            "metrics_interval_s": 0.1, "look_back_period_s": 0.3}}
        srv = start_server(self, [hello_app(deployment=dep)],
                           extra_config={"control_loop": {"interval_s": 0.05}})
        labels = dict(application="hello", deployment="Hello")
        k = key("moonserve_autoscaling_desired_replicas", **labels)
        self.assertTrue(wait_until(lambda: k in parse(
            srv.admin_request("GET", "/metrics").body.decode()), 10))
        got = parse(srv.admin_request("GET", "/metrics").body.decode())
        self.assertEqual(got[key("moonserve_autoscaling_total_requests", **labels)], 0)
        self.assertEqual(got[key("moonserve_autoscaling_queued_requests", **labels)], 0)
        self.assertLessEqual(got[k], 1)


CUSTOM_LUA = r'''
local serve = require "moonserve"
local metrics = serve.metrics
local M = serve.deployment { name = "M" }
function M:init()
  self.hits = metrics.Counter { name = "model_hits", description = "Hits, by model.",
                                tag_keys = { "model" } }
  self.hits:set_default_tags { model = "default" }
  self.up = metrics.Gauge { name = "replicas_up", description = "Set to 3 by each replica." }
  self.up:set(3)
  self.lat = metrics.Histogram { name = "model_latency_seconds", description = "Latency.",
                                 boundaries = { 0.01, 0.1, 1 }, tag_keys = { "model" } }
end
local function err(f) local ok, e = pcall(f); return ok and "no error" or tostring(e) end
function M:__call(req)
  if req.path:find("errors") then
    return {
      unknown_tag = err(function() self.hits:inc(1, { nope = "x" }) end),
      missing_tag = err(function() self.lat:observe(1) end),
      negative = err(function() self.hits:inc(-1) end),
      reserved = err(function() metrics.Counter { name = "moonserve_x" } end),
      bad_name = err(function() metrics.Gauge { name = "no-dash" } end),
      no_bounds = err(function() metrics.Histogram { name = "h" } end),
      reserved_tag = err(function() metrics.Gauge { name = "g", tag_keys = { "deployment" } } end),
      other_kind = err(function() metrics.Gauge { name = "model_hits", tag_keys = { "model" } } end),
    }
  end
  local model = req.query.model
  self.hits:inc(1, model and { model = model } or nil)
  self.lat:observe(tonumber(req.query.v or "0.05"), { model = model or "default" })
  return { ok = true }
end
return { app = M:bind() }
'''


class CustomMetricsTest(unittest.TestCase):
    """serve.metrics in deployment code: summed over the replicas, exported with the rest."""

    def setUp(self):
        dep = {"name": "M", "num_replicas": 2,
               "request_router_config": {"request_routing_stats_period_s": 0.2}}
        self.srv = start_server(self, [{"name": "m", "route_prefix": "/m",
                                        "import_path": "m.lua:app", "deployments": [dep]}],
                                files={"m.lua": CUSTOM_LUA})
        self.labels = dict(application="m", deployment="M")

    def samples(self):
        return parse(self.srv.admin_request("GET", "/metrics").body.decode())

    def test_values_are_summed_over_replicas(self):
        for i in range(8):
            self.assertEqual(self.srv.get("/m/x?model=a" if i % 2 else "/m/x?v=0.5").status, 200)
        hits = key("model_hits_total", model="a", **self.labels)
        dflt = key("model_hits_total", model="default", **self.labels)
        ok = wait_until(lambda: (lambda s: s.get(hits) == 4 and s.get(dflt) == 4)(self.samples()),
                        10)
        self.assertTrue(ok, self.srv.admin_request("GET", "/metrics").body.decode())
        got = self.samples()
        self.assertEqual(got[key("replicas_up", **self.labels)], 6)
        lat = "model_latency_seconds"
        self.assertEqual(got[key(lat + "_bucket", le="0.1", model="a", **self.labels)], 4)
        self.assertEqual(got[key(lat + "_bucket", le="0.1", model="default", **self.labels)], 0)
        self.assertEqual(got[key(lat + "_bucket", le="1", model="default", **self.labels)], 4)
        self.assertEqual(got[key(lat + "_bucket", le="+Inf", model="default", **self.labels)], 4)
        self.assertAlmostEqual(got[key(lat + "_sum", model="default", **self.labels)], 2.0)
        self.assertEqual(got[key(lat + "_count", model="a", **self.labels)], 4)
        text = self.srv.admin_request("GET", "/metrics").body.decode()
        self.assertIn("# HELP model_hits_total Hits, by model.\n# TYPE model_hits_total counter",
                      text)
        harness.assert_promtool_accepts(self, text)

    def test_misuse_is_a_clear_error(self):
        r = self.srv.get("/m/errors")
        self.assertEqual(r.status, 200, r)
        got = r.json()
        self.assertIn("unknown tag key nope", got["unknown_tag"])
        self.assertIn("missing value for tag key model", got["missing_tag"])
        self.assertIn("negative", got["negative"])
        self.assertIn("prefix moonserve_ is the engine's", got["reserved"])
        self.assertIn("name must match", got["bad_name"])
        self.assertIn("boundaries must be", got["no_bounds"])
        self.assertIn("tag key deployment is not allowed", got["reserved_tag"])
        self.assertIn("already exists as a Counter", got["other_kind"])


class MetricsTest(unittest.TestCase):
    def setUp(self):
        self.srv = start_server(self, [hello_app()])

    def scrape(self):
        r = self.srv.admin_request("GET", "/metrics")
        self.assertEqual(r.status, 200)
        return r.body.decode()

    def value(self, samples, name, **labels):
        return samples.get(key(name, **labels), 0.0)

    def test_requests_are_counted_by_route_method_and_status_class(self):
        before = parse(self.scrape())
        for _ in range(3):
            self.assertEqual(self.srv.get("/hello/x").status, 200)
        self.assertEqual(self.srv.request("POST", "/hello/y", body=b"{}").status, 200)
        self.assertEqual(self.srv.get("/hello/boom").status, 500)
        self.assertEqual(self.srv.get("/nowhere").status, 404)
        after = parse(self.scrape())

        def delta(name, **labels):
            return self.value(after, name, **labels) - self.value(before, name, **labels)
        total = "moonserve_http_requests_total"
        errors = "moonserve_http_error_requests_total"
        self.assertEqual(delta(total, method="GET", status_class="2xx", **HELLO), 3)
        self.assertEqual(delta(total, method="POST", status_class="2xx", **HELLO), 1)
        self.assertEqual(delta(total, method="GET", status_class="5xx", **HELLO), 1)
        self.assertEqual(delta(errors, method="GET", status_class="5xx", **HELLO), 1)
        self.assertEqual(delta(errors, method="GET", status_class="2xx", **HELLO), 0)
        self.assertNotIn(key(errors, method="GET", status_class="2xx", **HELLO), after)
        self.assertEqual(delta(total, method="GET", status_class="4xx", **NONE), 1)
        self.assertEqual(delta(errors, method="GET", status_class="4xx", **NONE), 1)

        hist = "moonserve_http_request_duration_seconds"
        labels = dict(status_class="2xx", **HELLO)
        self.assertEqual(delta(hist + "_count", **labels), 4)
        bounds = ["0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.3", "0.4",
                  "0.5", "1", "2", "5", "10", "60", "120", "300", "600", "+Inf"]
        counts = [self.value(after, hist + "_bucket", le=le, **labels) for le in bounds]
        self.assertEqual(counts, sorted(counts), "buckets are not cumulative")
        self.assertEqual(counts[-1], self.value(after, hist + "_count", **labels))
        self.assertGreater(self.value(after, hist + "_sum", **labels), 0)

    def test_latency_lands_in_the_right_bucket(self):
        self.assertEqual(self.srv.get("/hello/slow?sleep=0.25").status, 200)
        after = parse(self.scrape())
        labels = dict(status_class="2xx", **HELLO)
        hist = "moonserve_http_request_duration_seconds_bucket"
        self.assertEqual(self.value(after, hist, le="0.2", **labels), 0)
        self.assertEqual(self.value(after, hist, le="1", **labels), 1)
        # libuv timers count whole milliseconds from a cached loop time, so a 0.25 s sleep can
        # measure a fraction of a millisecond short of it on the controller's clock
        self.assertGreaterEqual(self.value(after, "moonserve_http_request_duration_seconds_sum",
                                           **labels), 0.245)

    def test_a_client_that_leaves_is_a_disconnection(self):
        s = self.srv.connect()
        s.sendall(harness.build_request("GET", "/hello/slow?sleep=30"))
        self.assertTrue(wait_until(
            lambda: 'moonserve_http_ongoing_requests 1' in self.scrape(), 5))
        s.close()
        name = "moonserve_http_requests_total"
        ok = wait_until(lambda: self.value(parse(self.scrape()), name, method="GET",
                                           status_class="disconnection", **HELLO) == 1, 10)
        self.assertTrue(ok, self.scrape())
        self.assertEqual(self.value(parse(self.scrape()), "moonserve_http_error_requests_total",
                                    method="GET", status_class="disconnection", **HELLO), 1)
        # The replica confirms the cancel; then the deployment counts it too.
        dep = dict(application="hello", deployment="Hello")
        self.assertTrue(wait_until(lambda: self.value(
            parse(self.scrape()), "moonserve_deployment_requests_total",
            status_class="disconnection", **dep) == 1, 10), self.scrape())

    def test_label_values_stay_bounded_under_many_paths(self):
        for i in range(10):
            self.srv.get("/hello/p%d" % i)
            self.srv.get("/gone%d" % i)
        few = set(parse(self.scrape()))
        for i in range(1000):
            r = self.srv.get("/hello/path-%d?q=%d" % (i, i) if i % 2 else "/other-%d" % i)
            self.assertIn(r.status, (200, 404))
        text = self.scrape()
        many = set(parse(text))
        self.assertEqual(many, few, "series appeared: %s" % sorted(many - few)[:5])
        self.assertNotIn("path-", text)
        self.assertNotIn("other-", text)

    def test_deployment_counts_requests_and_replica_losses(self):
        dep = dict(application="hello", deployment="Hello")
        before = parse(self.scrape())
        self.assertEqual(self.value(before, "moonserve_deployment_replica_starts_total", **dep), 1)
        self.assertEqual(self.srv.get("/hello/x").status, 200)
        self.assertEqual(self.srv.get("/hello/boom").status, 500)
        after = parse(self.scrape())

        def delta(name, **labels):
            return self.value(after, name, **labels) - self.value(before, name, **labels)
        self.assertEqual(delta("moonserve_deployment_requests_total", status_class="2xx", **dep), 1)
        self.assertEqual(delta("moonserve_deployment_requests_total", status_class="5xx", **dep), 1)
        self.assertEqual(delta("moonserve_deployment_error_requests_total", status_class="5xx",
                               **dep), 1)
        self.assertEqual(delta("moonserve_deployment_processing_duration_seconds_count", **dep), 2)
        self.assertEqual(delta("moonserve_deployment_queue_wait_seconds_count", **dep), 2)

        pid = self.srv.replica_pids()[0]
        harness.os.kill(pid, harness.signal.SIGKILL)
        name = "moonserve_deployment_replica_starts_total"
        self.assertTrue(wait_until(lambda: self.value(parse(self.scrape()), name, **dep) == 2, 15))
        self.assertEqual(self.value(parse(self.scrape()),
                                    "moonserve_deployment_replica_failures_total", **dep), 1)

    def test_promtool_accepts_the_text(self):
        self.srv.get("/hello/x")
        self.srv.get("/nowhere")
        harness.assert_promtool_accepts(self, self.scrape())


if __name__ == "__main__":
    harness.main()
