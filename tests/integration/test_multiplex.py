"""Model multiplexing (docs/lua-api.md, "Model multiplexing"; routing in docs/routing.md).

- serve.multiplexed keeps at most max_num_models_per_replica models per replica, evicting the
  least recently used one through the unload hook; concurrent requests for a model load it once;
  a loader's error fails its requests and the next request tries again.
- serve.get_multiplexed_model_id() reads the serve_multiplexed_model_id header, the handle option
  sets it, and a request's id goes on to the calls it makes.
- Routing prefers the replicas holding the model, then those with the fewest models; a burst for
  a new model loads it on one replica; replicas report their models at once (no stats period).
- A batch never mixes model ids.
- The multiplexing metrics reach /metrics.
"""

import harness
from harness import run_threads, wait_until


def parallel(fn, args, timeout=20):
    """fn(*a) for each a, all at once; their results in order (the first failure raises)."""
    out = []
    for result, exc in run_threads(fn, args, timeout):
        if exc is not None:
            raise exc
        out.append(result)
    return out

MUX_LUA = r'''
local serve = require "moonserve"
local multiplex = require "moonserve.multiplex"

local function model_class(name, replicas, cap)
  local D = serve.deployment { name = name, num_replicas = replicas, max_ongoing_requests = 32 }
  function D:init() self.loads, self.unloads = {}, {} end
  D.get_model = serve.multiplexed({
    max_num_models_per_replica = cap,
    unload = function(self, model, id) self.unloads[#self.unloads + 1] = id end,
  }, function(self, id)
    self.loads[#self.loads + 1] = id
    if id:find("^slow") then serve.sleep(0.3) end
    if id:find("^broken") then error("no weights for " .. id, 0) end
    return { id = id }
  end)
  function D:state()
    return { loads = serve.json.array(self.loads), unloads = serve.json.array(self.unloads),
             loaded = serve.json.array(multiplex.loaded()),
             replica = serve.get_replica_context().replica_tag }
  end
  function D:__call(req)
    local id = serve.get_multiplexed_model_id()
    local m = self:get_model(id)
    return { model = m.id, id = id, replica = serve.get_replica_context().replica_tag }
  end
  function D:which() return serve.get_multiplexed_model_id() end
  D.classify = serve.batch({ max_batch_size = 16, batch_wait_timeout_s = 0.2 }, function(self, xs)
    local id, out = serve.get_multiplexed_model_id(), {}
    for i, x in ipairs(xs) do out[i] = { model = id, size = #xs, x = x } end
    return out
  end)
  return D
end

local Lru = model_class("Lru", 1, 2)
local Pair = model_class("Pair", 2, 3)

local Front = serve.deployment { name = "Front", max_ongoing_requests = 64 }
function Front:init(lru, pair) self.lru, self.pair = lru, pair end
function Front:__call(req)
  local what, target = req.path:match("^/m/(%w+)/(%w+)")
  local h = target == "lru" and self.lru or self.pair
  if what == "state" then
    -- every replica's state: ask until each tag was seen (routing picks one per call)
    local seen, n = {}, 0
    for _ = 1, 200 do
      local s = h.state:remote():result()
      if not seen[s.replica] then seen[s.replica], n = s, n + 1 end
      if n == (target == "lru" and 1 or 2) then break end
    end
    return seen
  elseif what == "option" then
    return h.which:options { multiplexed_model_id = req.query.id }:remote():result()
  elseif what == "inherit" then
    return h.which:remote():result()
  elseif what == "batch" then
    return h.classify:options { multiplexed_model_id = req.query.id }:remote(req.query.x):result()
  end
  return h:remote(req):result()
end

return { app = Front:bind(Lru:bind(), Pair:bind()) }
'''

APPS = [{"name": "m", "route_prefix": "/m", "import_path": "mux.lua:app",
         "deployments": [{"name": n, "request_router_config":
                          {"request_routing_stats_period_s": 0.2}} for n in ("Lru", "Pair")]}]


class MultiplexTest(harness.ServerTestCase):
    APPLICATIONS = APPS
    FILES = {"mux.lua": MUX_LUA}

    def get(self, path, model=None, status=200):
        headers = {"serve_multiplexed_model_id": model} if model else None
        r = self.server.get(path, headers=headers, timeout=20)
        self.assertEqual(r.status, status, r)
        return r

    def state(self, target):
        return self.get("/m/state/%s" % target).json()

    def test_lru_eviction_at_the_cap_calls_unload(self):
        for m in ("lru-a", "lru-b", "lru-a", "lru-c"):  # touching a makes b the oldest
            got = self.get("/m/call/lru", model=m).json()
            self.assertEqual((got["model"], got["id"]), (m, m), got)
        (st,) = self.state("lru").values()
        self.assertEqual(st["unloads"][-1:], ["lru-b"], st)
        self.assertEqual(sorted(x for x in st["loaded"] if x.startswith("lru-")),
                         ["lru-a", "lru-c"], st)
        self.assertLessEqual(len(st["loaded"]), 2, st)
        self.assertEqual(st["loads"].count("lru-a"), 1, st)

    def test_concurrent_requests_load_a_model_once(self):
        results = parallel(lambda i: self.get("/m/call/lru", model="slow-x").json(),
                           [(i,) for i in range(6)])
        self.assertEqual([r["model"] for r in results], ["slow-x"] * 6)
        (st,) = self.state("lru").values()
        self.assertEqual(st["loads"].count("slow-x"), 1, st)

    def test_loader_error_fails_the_request_and_the_next_one_retries(self):
        for _ in range(2):
            r = self.get("/m/call/lru", model="broken-1", status=500)
            self.assertIn("loading model 'broken-1' failed: no weights for broken-1",
                          r.json()["error"])
        (st,) = self.state("lru").values()
        self.assertEqual(st["loads"].count("broken-1"), 2, st)
        self.assertNotIn("broken-1", st["loaded"], st)

    def test_model_id_from_header_option_and_parent(self):
        self.assertEqual(self.get("/m/option/pair?id=opt-1").body, b"opt-1")
        self.assertEqual(self.get("/m/inherit/pair", model="parent-1").body, b"parent-1")
        self.assertEqual(self.get("/m/inherit/pair").body, b"")

    def test_routing_prefers_holders_then_fewest_models(self):
        # a burst for a new model loads it on one replica only
        burst = parallel(lambda i: self.get("/m/call/pair", model="burst-1").json(),
                         [(i,) for i in range(8)])
        where = {r["replica"] for r in burst}
        self.assertEqual(len(where), 1, burst)
        holder = where.pop()
        # then every request for it goes to its holder
        for _ in range(20):
            self.assertEqual(self.get("/m/call/pair", model="burst-1").json()["replica"], holder)
        # a new model goes to the replica with fewer models: the other one
        other = self.get("/m/call/pair", model="fresh-1").json()["replica"]
        self.assertNotEqual(other, holder)
        st = self.state("pair")
        self.assertEqual(sorted(st), sorted([holder, other]), st)
        self.assertEqual(sum(s["loads"].count("burst-1") for s in st.values()), 1, st)

    def test_a_batch_never_mixes_model_ids(self):
        args = [("a" if i % 2 else "b", str(i)) for i in range(8)]
        got = parallel(lambda mid, x: self.get("/m/batch/lru?id=%s&x=%s" % (mid, x)).json(), args)
        for (mid, x), r in zip(args, got):
            self.assertEqual((r["model"], r["x"]), (mid, x), got)
            self.assertLessEqual(r["size"], 4, got)
        self.assertTrue(any(r["size"] > 1 for r in got), got)  # they did batch

    def test_metrics(self):
        self.get("/m/call/lru", model="metric-1")
        names = ("moonserve_multiplexed_models_load_total",
                 "moonserve_multiplexed_get_model_requests_total",
                 "moonserve_multiplexed_models{",
                 "moonserve_multiplexed_model_load_latency_seconds_bucket")

        def scraped():
            text = self.server.admin_request("GET", "/metrics").text
            return all(n in text for n in names) and text

        text = wait_until(scraped, 10)
        self.assertTrue(text, "multiplexing metrics never reached /metrics")
        harness.assert_promtool_accepts(self, text)


if __name__ == "__main__":
    harness.main()
