"""Request routers in Lua, end to end: a custom request_router_class decides (its kwargs reach
initialize_state, replicas' record_routing_stats reach candidates' routing_stats); broken
routers (infinite loop, loop under pcall, memory bomb, error) never fail a request — the engine
falls back to least-loaded — and their failures show in status; the library's routers from
scripts/routers/ (consistent hashing on X-Session-Id, least-loaded) do what they say."""

import glob
import os
import time
import unittest

import harness
from harness import hello_app, run_threads, start_server

CONTROL = {"control_loop": {"interval_s": 0.05}}
ROUTERS_DIR = os.path.join(harness.SOURCE_DIR, "scripts", "routers")


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


def router_dep(cls, kwargs=None, n=3, **extra):
    rc = {"request_router_class": cls}
    if kwargs is not None:
        rc["request_router_kwargs"] = kwargs
    rc.update(extra)
    return {"num_replicas": n, "request_router_config": rc, "graceful_shutdown_timeout_s": 2}


# picks the smallest or the largest replica id, as kwargs.pick says
PICK_ROUTER = r'''
local R = {}
local out, rank = {}, {}
out[1] = rank
function R:initialize_state(kwargs)
  self.pick = kwargs.pick or "min"
end
function R:choose_replicas(candidates, request)
  local best
  for i = 1, #candidates do
    local c = candidates[i]
    if not best or (self.pick == "max" and c.id > best.id) or (self.pick ~= "max" and c.id < best.id) then
      best = c
    end
  end
  if not best then return {} end
  rank[1] = best
  return out
end
return { Router = R }
'''

# prefers the replica whose own routing_stats say it is "chosen" (the stats carry the
# replica's id, so they must belong to the candidate they are attached to)
STATS_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  local best
  for i = 1, #candidates do
    local c = candidates[i]
    local st = c.routing_stats
    if st and st.rid ~= nil and st.rid ~= c.id then error("stats of " .. tostring(st.rid) .. " on " .. c.id) end
    if st and st.score and (not best or st.score > best.routing_stats.score) then best = c end
  end
  if best then return { { best } } end
  return { candidates }
end
return { Router = R }
'''

PID_LUA = r'''
local function my_pid()
  local f = io.open("/proc/self/stat", "r")
  local s = f:read("*l"); f:close()
  return tonumber(s:match("^(%d+)"))
end
'''

STATS_LUA = r'''
local serve = require "moonserve"
''' + PID_LUA + r'''
local Stat = serve.deployment { name = "Stat" }
function Stat:__call(req)
  return { replica = serve.get_replica_context().replica_id, pid = my_pid() }
end
function Stat:record_routing_stats()
  -- the score is the pid: the router sends everything to the largest pid
  return { score = my_pid() }
end
return { app = Stat:bind() }
'''

# checks every documented candidate and request field; a failed assert is a router failure
FIELDS_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  if request then
    assert(request.id == "probe-id-" .. (request.path:match("probe(%d+)") or "?"),
           "request.id " .. tostring(request.id) .. " for " .. tostring(request.path))
    assert(request.method == "POST", "request.method " .. tostring(request.method))
    assert(request.headers["x-probe"] == "yes", "request.headers['x-probe']")
    assert(request.body == "probe-body", "request.body " .. tostring(request.body))
    assert(request.multiplexed_model_id ~= nil, "request.multiplexed_model_id is nil")
  end
  for i = 1, #candidates do
    local c = candidates[i]
    assert(type(c.id) == "string", "c.id")
    assert(type(c.ongoing) == "number" and c.ongoing >= 0, "c.ongoing")
    assert(c.max_ongoing_requests == 3, "c.max_ongoing_requests " .. tostring(c.max_ongoing_requests))
    assert(type(c.routing_stats) == "table", "c.routing_stats")
    assert(type(c.multiplexed_model_ids) == "table", "c.multiplexed_model_ids")
  end
  return { candidates }
end
return { Router = R }
'''

SPIN_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  while true do end
end
return { Router = R }
'''

PCALL_SPIN_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  while true do pcall(function() while true do end end) end
end
return { Router = R }
'''

BOMB_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  local t = {}
  for i = 1, 1e9 do t[i] = string.rep("y", 4096) .. i end
end
return { Router = R }
'''

ERROR_ROUTER = r'''
local R = {}
function R:choose_replicas(candidates, request)
  error("router exploded")
end
return { Router = R }
'''


def ids_of(srv, app, dep):
    """The running replicas' pids, in the order of their replica ids (what routers compare).
    Replicas are told apart by pid in responses, so these tests do not depend on the replica
    context's id having the same spelling as the router's candidate id (test_admin checks that)."""
    reps = sorted(running(srv.deployment_status(app, dep)), key=lambda r: r["replica_id"])
    return [r["pid"] for r in reps]


class CustomRouterTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"pick.lua": PICK_ROUTER, "stats_router.lua": STATS_ROUTER, "stat.lua": STATS_LUA,
             "fields.lua": FIELDS_ROUTER}
    APPLICATIONS = [
        hello_app("pmin", "/pmin", router_dep("pick.lua:Router")),
        hello_app("pmax", "/pmax", router_dep("pick.lua:Router", {"pick": "max"})),
        hello_app("fields", "/fields", dict(router_dep("fields.lua:Router", n=2),
                                            max_ongoing_requests=3)),
        {"name": "stat", "route_prefix": "/stat", "import_path": "stat.lua:app",
         "deployments": [dict(router_dep("stats_router.lua:Router",
                                         request_routing_stats_period_s=0.1),
                              name="Stat")]},
    ]

    def wait_three(self, app, dep="Hello"):
        self.server.wait_status(app, dep, lambda d: len(running(d)) == 3, what="3 running")
        return ids_of(self.server, app, dep)

    def replicas_answering(self, path, n=9):
        seen = []
        for i in range(n):
            r = self.server.get("%s/r%d" % (path, i))
            self.assertEqual(r.status, 200, r)
            seen.append(r.json().get("pid"))
        return seen

    def test_router_decides_and_kwargs_reach_it(self):
        ids = self.wait_three("pmin")
        self.assertEqual(set(self.replicas_answering("/pmin")), {ids[0]})
        ids = self.wait_three("pmax")
        self.assertEqual(set(self.replicas_answering("/pmax")), {ids[-1]})

    def test_candidate_and_request_fields(self):
        srv = self.server
        srv.wait_status("fields", "Hello", lambda d: len(running(d)) == 2, what="2 running")
        for i in range(5):
            r = srv.request("POST", "/fields/probe%d" % i, body=b"probe-body",
                            headers={"X-Probe": "yes", "X-Request-ID": "probe-id-%d" % i})
            self.assertEqual(r.status, 200, r)
        info = srv.deployment_status("fields", "Hello").get("router") or {}
        self.assertEqual(info.get("failures", 0), 0, "router saw wrong fields: %r" % info)
        self.assertFalse(info.get("last_error"), info)

    def test_router_info_in_status(self):
        dep = self.server.deployment_status("pmax", "Hello")
        info = dep.get("router") or {}
        self.assertTrue(str(info.get("path", "")).endswith("pick.lua"), info)
        self.assertEqual(info.get("version"), 1, info)
        self.assertRegex(str(info.get("sha256")), r"^[0-9a-fA-F]{64}$")
        self.assertEqual(info.get("failures", 0), 0, info)

    def test_single_rank_waits_for_room_on_its_replica(self):
        # the router names one replica only: the engine honours its max_ongoing_requests (5)
        # and makes the rest wait for room there (Ray backs off and asks again), never failing
        ids = self.wait_three("pmin")
        t0 = time.monotonic()
        res = run_threads(lambda i: self.server.get("/pmin/s%d?sleep=0.5" % i, timeout=10),
                          [(i,) for i in range(8)], timeout=20)
        took = time.monotonic() - t0
        got = []
        for r, e in res:
            self.assertIsNone(e)
            self.assertEqual(r.status, 200, r)
            got.append(r.json().get("pid"))
        self.assertEqual(set(got), {ids[0]}, got)
        self.assertGreaterEqual(took, 0.95, "8 x 0.5 s on one replica capped at 5 took %.2fs"
                                % took)

    def test_routing_stats_reach_candidates(self):
        ids = self.wait_three("stat", "Stat")

        def all_to_max():
            seen = set(self.replicas_answering("/stat", 6))
            return seen == {max(ids)}
        ok = harness.wait_until(all_to_max, 10, 0.2)
        dep = self.server.deployment_status("stat", "Stat")
        self.assertTrue(ok, "routing_stats never steered requests to pid %s; router: %r"
                        % (max(ids), dep.get("router")))
        self.assertEqual((dep.get("router") or {}).get("failures", 0), 0, dep.get("router"))


class BrokenRouterTest(harness.ServerTestCase):
    EXTRA_CONFIG = CONTROL
    FILES = {"spin.lua": SPIN_ROUTER, "pspin.lua": PCALL_SPIN_ROUTER, "bomb.lua": BOMB_ROUTER,
             "err.lua": ERROR_ROUTER}
    APPLICATIONS = [
        hello_app("spin", "/spin", router_dep("spin.lua:Router", n=2)),
        hello_app("pspin", "/pspin", router_dep("pspin.lua:Router", n=2)),
        hello_app("bomb", "/bomb", router_dep("bomb.lua:Router", n=2)),
        hello_app("err", "/err", router_dep("err.lua:Router", n=2)),
    ]

    def _served_with_fallback(self, app, pattern):
        srv = self.server
        srv.wait_status(app, "Hello", lambda d: len(running(d)) == 2, what="2 running")
        t0 = time.monotonic()
        res = run_threads(lambda i: srv.get("/%s/x%d?sleep=0.1" % (app, i), timeout=10),
                          [(i,) for i in range(6)], timeout=20)
        seen = set()
        for r, e in res:
            self.assertIsNone(e)
            self.assertEqual(r.status, 200, r)
            seen.add(r.json().get("replica"))
        self.assertLess(time.monotonic() - t0, 8.0)
        # the fallback is least-loaded: 6 concurrent requests use both replicas
        self.assertEqual(len(seen), 2, seen)
        info = srv.deployment_status(app, "Hello").get("router") or {}
        self.assertGreaterEqual(info.get("failures") or 0, 6, info)
        self.assertRegex(str(info.get("last_error")), pattern)
        self.assertEqual(srv.get("/-/healthz").status, 200)

    def test_infinite_loop_router(self):
        self._served_with_fallback("spin", r"spin\.lua:\d+:")

    def test_infinite_loop_under_pcall(self):
        self._served_with_fallback("pspin", r"pspin\.lua:\d+:")

    def test_memory_bomb_router(self):
        self._served_with_fallback("bomb", r"bomb\.lua")

    def test_error_router(self):
        self._served_with_fallback("err", r"err\.lua:\d+: .*router exploded")


# ------------------------------------------------------------------------------------------------
# the library (scripts/routers/)


def library_router(*words):
    """The scripts/routers/*.lua file whose name holds one of words (absolute path)."""
    files = sorted(glob.glob(os.path.join(ROUTERS_DIR, "*.lua")))
    for w in words:
        for f in files:
            if w in os.path.basename(f):
                return f
    raise AssertionError("no router matching %r in %s (have %r)" % (words, ROUTERS_DIR, files))


class LibraryRouterTest(unittest.TestCase):

    def start(self, router, kwargs=None, app=None):
        app = app or hello_app("hello", "/hello", router_dep(router, kwargs))
        srv = start_server(self, [app], extra_config=CONTROL, files={"slow.lua": SLOW_LUA})
        srv.wait_status("hello", "Hello", lambda d: len(running(d)) == 3, what="3 running")
        info = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertIn(os.path.basename(router.split(":")[0]), str(info.get("path")), info)
        return srv

    def test_consistent_hash_keeps_sessions_on_one_replica(self):
        path = library_router("consistent", "hash")
        srv = self.start(path + ":" + CONSISTENT_ATTR, CONSISTENT_KWARGS)
        owner = {}
        for rnd in range(4):
            for s in range(12):
                sid = "session-%d" % s
                r = srv.get("/hello/c%d" % rnd, headers={"X-Session-Id": sid})
                self.assertEqual(r.status, 200, r)
                rep = r.json().get("replica")
                self.assertEqual(owner.setdefault(sid, rep), rep,
                                 "%s moved from %s to %s" % (sid, owner[sid], rep))
        self.assertGreaterEqual(len(set(owner.values())), 2,
                                "12 sessions all on one replica: %r" % owner)
        info = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertEqual(info.get("failures", 0), 0, info)
        srv.stop()

    def test_least_loaded_spreads_concurrent_requests(self):
        path = library_router("least")
        srv = self.start(path + ":" + LEAST_ATTR, None)
        res = run_threads(lambda i: srv.get("/hello/l%d?sleep=1.0" % i, timeout=10),
                          [(i,) for i in range(6)], timeout=20)
        got = {}
        for r, e in res:
            self.assertIsNone(e)
            self.assertEqual(r.status, 200, r)
            rep = r.json().get("replica")
            got[rep] = got.get(rep, 0) + 1
        self.assertEqual(sorted(got.values()), [2, 2, 2],
                         "6 concurrent requests over 3 replicas: %r" % got)
        info = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertEqual(info.get("failures", 0), 0, info)
        srv.stop()

    def test_prefix_affinity_keeps_a_prefix_on_one_replica(self):
        path = library_router("prefix")
        srv = self.start(path + ":" + PREFIX_ATTR, {"prefix_bytes": 16})
        owner = {}
        for rnd in range(4):
            for p in range(10):
                prefix = ("system-prompt-%02d" % p).ljust(16, "_")
                body = prefix + " question %d-%d" % (rnd, p)
                r = srv.request("POST", "/hello/p", body=body.encode())
                self.assertEqual(r.status, 200, r)
                rep = r.json().get("replica")
                self.assertEqual(owner.setdefault(prefix, rep), rep,
                                 "prefix %r moved from %s to %s" % (prefix, owner[prefix], rep))
        self.assertGreaterEqual(len(set(owner.values())), 2,
                                "10 prefixes all on one replica: %r" % owner)
        info = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertEqual(info.get("failures", 0), 0, info)
        srv.stop()

    def test_latency_aware_avoids_the_slow_replica(self):
        path = library_router("latency")
        app = {"name": "hello", "route_prefix": "/hello", "import_path": "slow.lua:app",
               "deployments": [dict(router_dep(path + ":" + LATENCY_ATTR, {"sample": 0}),
                                    name="Hello")]}
        srv = self.start(path + ":" + LATENCY_ATTR, app=app)
        ids = ids_of(srv, "hello", "Hello")
        slow = ids[0]
        got = {}
        for i in range(30):
            r = srv.get("/hello/q%d?slow=%d" % (i, slow), timeout=10)
            self.assertEqual(r.status, 200, r)
            rep = r.json().get("pid")
            got[rep] = got.get(rep, 0) + 1
        self.assertLessEqual(got.get(slow, 0), 3,
                             "the slow replica %s got %r of 30 sequential requests"
                             % (slow, got))
        info = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertEqual(info.get("failures", 0), 0, info)
        srv.stop()


# a replica is slow (0.3 s) when the request names its pid in ?slow=, fast (10 ms) otherwise
SLOW_LUA = r'''
local serve = require "moonserve"
''' + PID_LUA + r'''
local Hello = serve.deployment { name = "Hello" }
function Hello:__call(req)
  local me = my_pid()
  if tonumber(req.query.slow) == me then serve.sleep(0.3) else serve.sleep(0.01) end
  return { replica = serve.get_replica_context().replica_id, pid = me }
end
return { app = Hello:bind() }
'''


# attribute names and kwargs of the library routers (scripts/routers/*.lua headers)
CONSISTENT_ATTR = "ConsistentHash"
CONSISTENT_KWARGS = {"header": "x-session-id"}
LEAST_ATTR = "LeastLoaded"
PREFIX_ATTR = "PrefixAffinity"
LATENCY_ATTR = "LatencyAware"


if __name__ == "__main__":
    harness.main()
