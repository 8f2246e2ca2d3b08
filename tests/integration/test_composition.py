"""Fan-out, deadlines, cancellation and call errors through handles (docs/lua-api.md, "Waiting
on several calls", "Deadlines and cancellation", "Call errors"; the header is in
docs/replica-protocol.md, "Deadlines").

- serve.gather / serve.wait / serve.first and future:result(timeout_s) give the right values, in
  order, and cancel what they say they cancel (a cancelled call's result() raises "cancelled").
- A callee's error reaches the caller as an object naming the callee and keeping its message.
- A deadline (the client's X-Moonserve-Timeout-Ms, http.request_timeout_s, or a parent's own
  handle timeout_s) and a client disconnect reach a grandchild, whose side effect (a counter it
  bumps every 20 ms for 10 s) stops.
- A chain of 10 deployments answers.
"""

import json
import time
import unittest

import harness
from harness import build_request

COMPOSE_LUA = r'''
local serve = require "moonserve"

local Worker = serve.deployment { name = "Worker", max_ongoing_requests = 64 }
function Worker:init() self.count = {} end
function Worker:echo(x, delay)
  if delay and delay > 0 then serve.sleep(delay) end
  return x
end
function Worker:fail(msg) error(msg, 0) end
-- The side effect a cancelled request must stop: a counter bumped every 20 ms, n times.
function Worker:tick(key, n)
  for _ = 1, n do
    serve.sleep(0.02)
    self.count[key] = (self.count[key] or 0) + 1
  end
  return self.count[key]
end
-- The counter, and the counter again after `window` seconds: equal once nothing bumps it.
function Worker:count_twice(key, window)
  local a = self.count[key] or 0
  serve.sleep(window)
  return { a, self.count[key] or 0 }
end
function Worker:left() return serve.time_left() end

local Middle = serve.deployment { name = "Middle", max_ongoing_requests = 64 }
function Middle:init(worker) self.worker = worker end
function Middle:relay(key, n) return self.worker.tick:remote(key, n):result() end
function Middle:left()
  return { mine = serve.time_left(), child = self.worker.left:remote():result() }
end

-- Ten deployments in a line: each adds its name and calls the next.
local chain = nil
for i = 10, 1, -1 do
  local D = serve.deployment { name = "L" .. i }
  function D:init(nxt) self.nxt = nxt end
  function D:__call(path)
    path[#path + 1] = "L" .. i
    if self.nxt then return self.nxt:remote(path):result() end
    return path
  end
  chain = chain and D:bind(chain) or D:bind()
end

local function err_fields(e)
  if not serve.is_call_error(e) then return { not_an_object = tostring(e) } end
  return { kind = e.kind, status = e.status or serve.json.null, deployment = e.deployment,
           method = e.method or serve.json.null, app = e.app, message = e.message,
           text = tostring(e) }
end

-- What a call raises: its error's fields, or "no error".
local function raised(fn, ...)
  local ok, e = pcall(fn, ...)
  return ok and "no error" or err_fields(e)
end

local Front = serve.deployment { name = "Front", max_ongoing_requests = 64 }
function Front:init(worker, middle, chain)
  self.w, self.m, self.chain = worker, middle, chain
end

local CASES = {}
function CASES.gather(self)
  local w = self.w
  local f2 = w.echo:remote("b", 0)
  return serve.gather { w.echo:remote(1, 0.05), f2, w.echo:remote({ k = 3 }, 0.02), f2 }
end
function CASES.gather_fails_fast(self)
  local slow = self.w.echo:remote("slow", 10)
  local err = raised(serve.gather, { slow, self.w.fail:remote("nope") })
  return { err = err, slow = raised(slow.result, slow) }
end
function CASES.gather_timeout(self)
  local quick, slow = self.w.echo:remote(1, 0), self.w.echo:remote(2, 10)
  local err = raised(serve.gather, { quick, slow }, { timeout_s = 0.2 })
  return { err = err, quick = quick:result(), slow = raised(slow.result, slow) }
end
function CASES.wait(self)
  local quick, slow = self.w.echo:remote(1, 0), self.w.echo:remote(2, 10)
  local done, pending = serve.wait({ quick, slow }, { num_returns = 1 })
  local out = { n_done = #done, n_pending = #pending, done_is_quick = done[1] == quick,
                pending_is_slow = pending[1] == slow }
  local d2, p2 = serve.wait({ slow }, { timeout_s = 0.05 })
  out.timed_out = #d2 == 0 and #p2 == 1 and not slow:done()
  slow:cancel()
  out.after_cancel = raised(slow.result, slow)
  local all = serve.wait { self.w.echo:remote(1, 0), self.w.echo:remote(2, 0.01) }
  out.all = #all
  return out
end
function CASES.first(self)
  local slow, fast = self.w.echo:remote("slow", 10), self.w.echo:remote("fast", 0.01)
  local winner, value = serve.first { slow, fast }
  return { winner_is_fast = winner == fast, value = value, slow = raised(slow.result, slow) }
end
function CASES.result_timeout(self)
  local f = self.w.echo:remote(7, 10)
  local err = raised(f.result, f, 0.05)
  local still = not f:done()
  f:cancel()
  return { err = err, still_running = still, after_cancel = raised(f.result, f) }
end
function CASES.handle_timeout(self)
  local w = self.w:options { timeout_s = 0.2 }
  return { err = raised(function() return w.echo:remote(1, 10):result() end),
           ok = w.echo:remote("in time", 0):result() }
end
function CASES.error_object(self)
  return raised(function() return self.w.fail:remote("kaput: bad input"):result() end)
end
function CASES.uncaught(self)
  return self.w.fail:remote("nobody caught this"):result()
end
function CASES.left(self)
  return { mine = serve.time_left() or "none", below = self.m.left:remote():result() }
end
function CASES.relay(self, req)
  return self.m.relay:remote(req.query.key, 500):result()
end
function CASES.parent_timeout(self, req)
  local m = self.m:options { timeout_s = 0.3 }
  return raised(function() return m.relay:remote(req.query.key, 500):result() end)
end
function CASES.cancel_tick(self, req)
  local f = self.w.tick:remote(req.query.key, 500)
  while (self.w.count_twice:remote(req.query.key, 0):result())[1] == 0 do serve.sleep(0.02) end
  f:cancel()
  return raised(f.result, f)
end
function CASES.count(self, req)
  return self.w.count_twice:remote(req.query.key, 0.1):result()
end
function CASES.chain(self)
  return self.chain:remote({}):result()
end

function Front:__call(req)
  return CASES[req.path:match("^/c/([%w_]+)")](self, req)
end

local worker = Worker:bind()
return { app = Front:bind(worker, Middle:bind(worker), chain) }
'''

APPS = [{"name": "c", "route_prefix": "/c", "import_path": "compose.lua:app"}]


def Grandchild(test, key):
    """The Worker's tick counter for one key, read through the front."""
    return harness.SideEffect(test, "/c/count?key=" + key)


class CompositionTest(harness.ServerTestCase):
    APPLICATIONS = APPS
    FILES = {"compose.lua": COMPOSE_LUA}

    def call(self, path, **kw):
        r = self.server.get(path, **kw)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def assertCallError(self, err, kind, status, method, message_re):
        self.assertEqual(err.get("kind"), kind, err)
        self.assertEqual(err.get("status"), status, err)
        self.assertEqual(err.get("deployment"), "Worker", err)
        self.assertEqual(err.get("app"), "c", err)
        self.assertEqual(err.get("method"), method, err)
        self.assertRegex(err.get("message"), message_re, err)

    def test_gather_keeps_order_and_repeats(self):
        self.assertEqual(self.call("/c/gather"), [1, "b", {"k": 3}, "b"])

    def test_gather_fails_fast_and_cancels_the_rest(self):
        got = self.call("/c/gather_fails_fast")
        self.assertCallError(got["err"], "failed", 500, "fail", r"^nope$")
        self.assertEqual(got["err"]["text"], "call to c/Worker.fail failed with status 500: nope")
        self.assertEqual(got["slow"]["kind"], "cancelled", got)

    def test_gather_timeout_cancels_the_rest(self):
        got = self.call("/c/gather_timeout")
        self.assertEqual(got["err"]["kind"], "timeout", got)
        self.assertEqual(got["err"]["status"], 408, got)
        self.assertRegex(got["err"]["text"], r"no answer within 0\.2s")
        self.assertEqual(got["quick"], 1)
        self.assertEqual(got["slow"]["kind"], "cancelled", got)

    def test_wait_splits_done_and_pending(self):
        got = self.call("/c/wait")
        self.assertEqual(got["n_done"], 1, got)
        self.assertEqual(got["n_pending"], 1, got)
        self.assertTrue(got["done_is_quick"], got)
        self.assertTrue(got["pending_is_slow"], got)
        self.assertTrue(got["timed_out"], got)
        self.assertEqual(got["after_cancel"]["kind"], "cancelled", got)
        self.assertEqual(got["all"], 2, got)

    def test_first_takes_the_winner_and_cancels_the_others(self):
        got = self.call("/c/first")
        self.assertTrue(got["winner_is_fast"], got)
        self.assertEqual(got["value"], "fast")
        self.assertEqual(got["slow"]["kind"], "cancelled", got)

    def test_result_timeout_leaves_the_call_running(self):
        got = self.call("/c/result_timeout")
        self.assertCallError(got["err"], "timeout", 408, "echo", r"within 0\.05s")
        self.assertTrue(got["still_running"], got)
        self.assertCallError(got["after_cancel"], "cancelled", None, "echo", r"cancelled")

    def test_cancel_stops_the_callee(self):
        g = Grandchild(self, "cancel")
        got = self.call("/c/cancel_tick?key=cancel")
        self.assertCallError(got, "cancelled", None, "tick", r"cancelled by the caller")
        g.assert_stops()

    def test_handle_timeout_is_enforced_by_the_controller(self):
        got = self.call("/c/handle_timeout")
        self.assertCallError(got["err"], "timeout", 408, "echo", r"timed out after 0\.2s")
        self.assertEqual(got["ok"], "in time")

    def test_error_object_names_the_callee(self):
        got = self.call("/c/error_object")
        self.assertCallError(got, "failed", 500, "fail", r"^kaput: bad input$")
        self.assertEqual(got["text"], "call to c/Worker.fail failed with status 500: "
                                      "kaput: bad input")

    def test_uncaught_error_object_answers_with_its_text(self):
        r = self.server.get("/c/uncaught")
        body = self.assertErrorJSON(r, 500)
        self.assertIn("call to c/Worker.fail failed with status 500: nobody caught this",
                      body["error"])

    def test_client_deadline_reaches_every_hop(self):
        got = self.call("/c/left", headers={"X-Moonserve-Timeout-Ms": "5000"})
        mine, middle, worker = got["mine"], got["below"]["mine"], got["below"]["child"]
        self.assertTrue(4.0 < mine <= 5.0, got)
        self.assertTrue(0 < middle <= mine, got)
        self.assertTrue(0 < worker <= middle, got)

    def test_no_deadline_without_header_or_request_timeout(self):
        self.assertEqual(self.call("/c/left")["mine"], "none")

    def test_bad_or_past_deadline_header(self):
        r = self.server.get("/c/left", headers={"X-Moonserve-Timeout-Ms": "soon"})
        body = self.assertErrorJSON(r, 400)
        self.assertIn("X-Moonserve-Timeout-Ms must be a whole number of milliseconds", body["error"])
        r = self.server.get("/c/left", headers={"X-Moonserve-Timeout-Ms": "0"})
        body = self.assertErrorJSON(r, 408)
        self.assertIn("deadline had passed", body["error"])

    def test_client_deadline_stops_the_grandchild(self):
        g = Grandchild(self, "hdr")
        r = self.server.get("/c/relay?key=hdr", headers={"X-Moonserve-Timeout-Ms": "300"},
                            timeout=10)
        body = self.assertErrorJSON(r, 408)
        self.assertIn("timed out after 0.3s", body["error"])
        g.assert_stops()

    def test_parent_timeout_stops_the_grandchild(self):
        g = Grandchild(self, "parent")
        got = self.call("/c/parent_timeout?key=parent", timeout=10)
        self.assertEqual(got["kind"], "timeout", got)
        self.assertEqual(got["deployment"], "Middle", got)
        g.assert_stops()

    def test_client_disconnect_stops_the_grandchild(self):
        g = Grandchild(self, "gone")
        s = self.server.connect()
        s.sendall(build_request("GET", "/c/relay?key=gone"))
        g.wait_started()
        s.close()
        g.assert_stops()

    def test_chain_of_ten_deployments(self):
        self.assertEqual(self.call("/c/chain"), ["L%d" % i for i in range(1, 11)])


class RequestTimeoutTest(harness.ServerTestCase):
    """http.request_timeout_s is a deadline for the whole tree, not only for the first hop."""
    APPLICATIONS = APPS
    FILES = {"compose.lua": COMPOSE_LUA}
    HTTP_OPTIONS = {"request_timeout_s": 0.5}

    def test_request_timeout_is_the_deadline_below(self):
        r = self.server.get("/c/left")
        self.assertEqual(r.status, 200, r)
        got = r.json()
        self.assertTrue(0 < got["below"]["child"] <= got["below"]["mine"] <= got["mine"] <= 0.5,
                        got)

    def test_request_timeout_stops_the_grandchild(self):
        g = Grandchild(self, "rt")
        r = self.server.get("/c/relay?key=rt", timeout=10)
        body = self.assertErrorJSON(r, 408)
        self.assertIn("timed out after 0.5s", body["error"])
        g.assert_stops()


if __name__ == "__main__":
    harness.main()
