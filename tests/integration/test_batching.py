"""serve.batch: batches formed in C inside the replica (docs/batching.md). Batches fill up to
max_batch_size, a lone item runs after the wait, max_concurrent_batches caps the batches running
at once, batch_size_fn sizes items (an item larger than a batch fails alone), a wrong-length
result fails every caller of that batch while the replica keeps serving, a cancelled request
leaves its batch before the batch runs, settings change at run time through reconfigure(),
`moonserve check` warns about batches that can never fill, and the batch metrics reach
/metrics."""

import os
import tempfile
import unittest

import harness
from harness import build_request, run_cli, run_threads

BATCH_LUA = r'''
local serve = require "moonserve"

local function batched(name, opts)
  local D = serve.deployment { name = name, max_ongoing_requests = 64 }
  function D:init() self.seq, self.running, self.peak = 0, 0, 0 end
  function D:reconfigure(cfg)
    if cfg.max_batch_size then self.run:set_max_batch_size(cfg.max_batch_size) end
  end
  D.run = serve.batch(opts, function(self, items)
    self.seq = self.seq + 1
    local id, sleep, total = self.seq, 0, 0
    for _, it in ipairs(items) do
      sleep = math.max(sleep, it.sleep or 0)
      total = total + (it.n or 1)
      if it.bad then return {} end
    end
    self.running = self.running + 1
    self.peak = math.max(self.peak, self.running)
    if sleep > 0 then serve.sleep(sleep) end
    self.running = self.running - 1
    local out = {}
    for i, it in ipairs(items) do
      out[i] = { batch = id, size = #items, total = total, v = it.v, peak = self.peak }
    end
    return out
  end)
  function D:__call(req)
    local q = req.query
    if q.stats then return self.run:stats() end
    return self:run({ v = q.v, sleep = tonumber(q.sleep), n = tonumber(q.n), bad = q.bad })
  end
  return D
end

local One = batched("One", { max_batch_size = 4, batch_wait_timeout_s = 0.3 })
local Two = batched("Two", { max_batch_size = 4, batch_wait_timeout_s = 0.05,
                             max_concurrent_batches = 2 })
local Sized = batched("Sized", { max_batch_size = 4, batch_wait_timeout_s = 0.2,
                                 batch_size_fn = function(items)
                                   local s = 0
                                   for _, it in ipairs(items) do s = s + (it.n or 1) end
                                   return s
                                 end })
local Slow = batched("Slow", { max_batch_size = 4, batch_wait_timeout_s = 1.5 })
local Adaptive = batched("Adaptive", { max_batch_size = 4, batch_wait_timeout_s = 0.4,
                                       latency_target_s = 2 })
return { one = One:bind(), two = Two:bind(), sized = Sized:bind(), slow = Slow:bind(),
         adaptive = Adaptive:bind() }
'''

FAST_STATS = {"request_router_config": {"request_routing_stats_period_s": 0.2}}


def app(name, prefix, attr, **deployment):
    d = {"name": attr.capitalize()}
    d.update(deployment)
    return {"name": name, "route_prefix": prefix, "import_path": "batch.lua:" + attr,
            "deployments": [d]}


class BatchingTest(harness.ServerTestCase):
    APPLICATIONS = [
        app("one", "/one", "one", **FAST_STATS),
        app("two", "/two", "two"),
        app("sized", "/sized", "sized"),
        app("slow", "/slow", "slow"),
        app("adaptive", "/adaptive", "adaptive"),
    ]
    FILES = {"batch.lua": BATCH_LUA}

    def call(self, path):
        r = self.server.get(path, timeout=20)
        return r.status, (r.json() if r.status == 200 else r.text)

    def concurrent(self, paths):
        out = run_threads(self.call, [(p,) for p in paths], 30)
        for _, exc in out:
            if exc:
                raise exc
        return [r for r, _ in out]

    def test_batches_fill_to_max_batch_size(self):
        out = self.concurrent(["/one?v=%d" % i for i in range(8)])
        self.assertTrue(all(s == 200 for s, _ in out), out)
        sizes = sorted(b["size"] for _, b in out)
        self.assertEqual(sizes, [4] * 8, out)
        self.assertEqual(len({b["batch"] for _, b in out}), 2)
        self.assertEqual(sorted(b["v"] for _, b in out), sorted(str(i) for i in range(8)))

    def test_lone_item_runs_after_the_wait(self):
        status, body = self.call("/one?v=alone")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["size"], 1)
        self.assertEqual(body["v"], "alone")

    def test_concurrency_cap(self):
        one = self.concurrent(["/one?v=%d&sleep=0.3" % i for i in range(8)])
        two = self.concurrent(["/two?v=%d&sleep=0.3" % i for i in range(8)])
        self.assertTrue(all(s == 200 for s, _ in one + two), one + two)
        self.assertEqual(max(b["peak"] for _, b in one), 1)
        self.assertEqual(max(b["peak"] for _, b in two), 2)

    def test_batch_size_fn(self):
        out = self.concurrent(["/sized?v=%d&n=%d" % (i, n) for i, n in enumerate([3, 3, 2, 1, 1])])
        self.assertTrue(all(s == 200 for s, _ in out), out)
        self.assertTrue(all(b["total"] <= 4 for _, b in out), out)
        status, body = self.call("/sized?v=huge&n=5")
        self.assertEqual(status, 500)
        self.assertIn("larger than max_batch_size 4", body)

    def test_wrong_length_fails_the_batch_not_the_replica(self):
        out = self.concurrent(["/one?v=1&bad=1", "/one?v=2", "/one?v=3", "/one?v=4"])
        self.assertEqual([s for s, _ in out], [500] * 4, out)
        self.assertTrue(all("must return a list of the same length" in b for _, b in out), out)
        status, body = self.call("/one?v=after")
        self.assertEqual(status, 200, body)

    def test_cancelled_request_leaves_its_batch(self):
        s = self.server.connect(timeout=5)
        s.sendall(build_request("GET", "/slow?v=gone"))
        s.close()  # the client leaves while its item waits in the batch queue
        out = self.concurrent(["/slow?v=%d" % i for i in range(3)])
        self.assertTrue(all(st == 200 for st, _ in out), out)
        self.assertEqual([b["size"] for _, b in out], [3, 3, 3], out)

    def test_adaptive_wait_learns_nobody_joins_a_lone_caller(self):
        # the first wait is min(batch_wait_timeout_s, target / 4) = 0.4 s; each lone batch
        # halves it, so ten more sequential callers drive it to (almost) nothing
        self.assertEqual(self.call("/adaptive?v=first")[1]["size"], 1)
        self.assertAlmostEqual(self.call("/adaptive?stats=1")[1]["wait_s"], 0.2, places=3)
        for i in range(10):
            status, body = self.call("/adaptive?v=%d" % i)
            self.assertEqual((status, body["size"]), (200, 1), body)
        self.assertLess(self.call("/adaptive?stats=1")[1]["wait_s"], 0.001)
        # with no wait left, callers that arrive while a batch runs still share the next one
        out = self.concurrent(["/adaptive?v=c%d&sleep=0.3" % i for i in range(4)])
        self.assertTrue(all(s == 200 for s, _ in out), out)
        self.assertGreater(max(b["size"] for _, b in out), 1, out)

    def test_metrics(self):
        self.concurrent(["/one?v=%d" % i for i in range(4)])

        def scraped():
            r = self.server.admin_request("GET", "/metrics")
            text = r.body.decode()
            for line in text.splitlines():
                if line.startswith("moonserve_batches_processed_total{") and \
                        'deployment="One"' in line and 'function_name="run"' in line:
                    if float(line.rsplit(" ", 1)[1]) >= 1:
                        return text
            return None

        text = harness.wait_until(scraped, timeout=10)
        self.assertTrue(text, "no batch metrics for One.run")
        for name in ("moonserve_batch_queue_length{",
                     "moonserve_batch_wait_time_seconds_bucket{",
                     "moonserve_batch_execution_time_seconds_count{",
                     "moonserve_batch_utilization_percent_sum{",
                     "moonserve_batch_actual_size_bucket{"):
            self.assertIn(name, text)
        harness.assert_promtool_accepts(self, text)


class BatchReconfigureTest(harness.ServerTestCase):
    """max_batch_size changed through user_config -> reconfigure(), at start and live."""
    APPLICATIONS = [app("one", "/one", "one", user_config={"max_batch_size": 2})]
    FILES = {"batch.lua": BATCH_LUA}

    def sizes(self):
        out = run_threads(lambda i: self.server.get("/one?v=%d" % i, timeout=20),
                          [(i,) for i in range(8)], 30)
        self.assertTrue(all(r and r.status == 200 for r, _ in out), out)
        return {r.json()["size"] for r, _ in out}

    def test_user_config_sets_the_batch_size(self):
        self.assertEqual(self.sizes(), {2})
        cfg = {"http_options": self.server.http_options,
               "admin": {"host": self.server.host, "port": self.server.admin_port},
               "applications": [app("one", "/one", "one", user_config={"max_batch_size": 4})]}
        r = self.server.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 200, r)
        ok = harness.wait_until(lambda: self.sizes() == {4}, timeout=10)
        self.assertTrue(ok, "the new max_batch_size never took effect")


class BatchCheckTest(unittest.TestCase):
    """`moonserve check` warns when max_ongoing_requests keeps a batch from ever filling."""

    def test_check_warns(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "batch.lua"), "w") as f:
                f.write(BATCH_LUA)
            path = os.path.join(d, "small.yaml")
            with open(path, "w") as f:
                f.write(harness.to_yaml({"applications": [
                    app("one", "/one", "one", max_ongoing_requests=2)]}))
            rc, out = run_cli("check", path)
        self.assertEqual(rc, 0, out)
        self.assertIn("small.yaml:", out)
        self.assertIn("max_ongoing_requests (2) is less than max_batch_size * "
                      "max_concurrent_batches (4) of batched method 'run'", out)


if __name__ == "__main__":
    harness.main()
