"""Streaming through handles and Server-Sent Events (docs/lua-api.md, "Streaming through
handles", "Server-Sent Events"; the frames are in docs/replica-protocol.md, "Value streams").

- handle:options{stream = true}:remote(...) iterates the callee's send(v) values, types intact,
  in order, and the first arrives while the producer is still running (it waits on a gate the
  test opens only after reading it), relayed to the client as SSE through the ingress.
- A producer's error mid-stream surfaces after the items sent before it, as a CallError.
- A method that does not return serve.stream, called with stream = true, is a clear error.
- Large streams arrive whole through the reader's flow control; a request forwarded as is
  streams its raw body.
- A client disconnect, or stream:cancel(), stops the producer two hops down (its side effect, a
  counter bumped every 20 ms, stops).
- serve.sse frames data (multi-line, JSON), event, id, retry and comments exactly, and refuses
  fields that would break the framing.
"""

import hashlib

import harness
from harness import HTTPReader, build_request

STREAMS_LUA = r'''
local serve = require "moonserve"

local Model = serve.deployment { name = "Model", max_ongoing_requests = 64 }
function Model:init() self.count, self.gate = {}, {} end
function Model:values(n)
  return serve.stream(function(send)
    for i = 1, n do
      send({ i = i, s = "tok" .. i, bin = "\0\255" .. i, f = i + 0.25, list = { i, true } })
    end
    send(2 ^ 53)
    send(false)
  end)
end
-- One item, then nothing until release(key) opens the gate.
function Model:gated(key)
  return serve.stream(function(send)
    send("first")
    while not self.gate[key] do serve.sleep(0.01) end
    send("second")
    send("third")
  end)
end
function Model:release(key) self.gate[key] = true end
-- The side effect a cancelled stream must stop: a counter bumped every 20 ms, 500 times.
function Model:ticks(key)
  return serve.stream(function(send)
    for i = 1, 500 do
      self.count[key] = (self.count[key] or 0) + 1
      send("t" .. i .. ";")
      serve.sleep(0.02)
    end
  end)
end
function Model:count_twice(key, window)
  local a = self.count[key] or 0
  serve.sleep(window)
  return { a, self.count[key] or 0 }
end
function Model:fails(n)
  return serve.stream(function(send)
    for i = 1, n do send(i) end
    error("model broke after " .. n, 0)
  end)
end
function Model:plain(x) return x end
function Model:big(n, size)
  return serve.stream(function(send)
    for i = 1, n do send(string.rep(string.char(65 + i % 26), size)) end
  end)
end
function Model:__call(req)
  return serve.stream(function(send)
    send("raw-1;")
    send("raw-2;" .. req.path)
  end)
end

-- The middle hop of a two-hop relay.
local Relay = serve.deployment { name = "Relay", max_ongoing_requests = 64 }
function Relay:init(m) self.m = m end
function Relay:ticks(key)
  return serve.stream(function(send)
    for tok in self.m.ticks:options { stream = true }:remote(key) do send(tok) end
  end)
end

local Front = serve.deployment { name = "Front", max_ongoing_requests = 64 }
function Front:init(m, relay) self.m, self.relay = m, relay end

local function failure(err)
  return { kind = err.kind, status = err.status, message = err.message,
           deployment = err.deployment, method = err.method, text = tostring(err) }
end

local CASES = {}
function CASES.values(self, req)
  local got = {}
  local s = self.m.values:options { stream = true }:remote(tonumber(req.query.n))
  for v in s do got[#got + 1] = v end
  assert(s:done() and s:next() == nil)
  local bin_ok = got[1].bin == "\0\2551"
  got[1].bin, got[#got - 2].bin = nil, nil -- JSON cannot carry them to the test
  return { n = #got, first = got[1], last = got[#got - 2], big = got[#got - 1] == 2 ^ 53,
           false_kept = got[#got] == false, bin_ok = bin_ok }
end
function CASES.sse_gated(self, req)
  local s = self.m.gated:options { stream = true }:remote(req.query.key)
  return serve.sse(function(send)
    for tok in s do send { event = "token", data = tok } end
  end)
end
function CASES.release(self, req)
  self.m.release:remote(req.query.key):result()
  return "released"
end
function CASES.sse_ticks(self, req)
  local s = self.relay.ticks:options { stream = true }:remote(req.query.key)
  return serve.sse(function(send)
    for tok in s do send(tok) end
  end)
end
function CASES.cancel_after(self, req)
  local s = self.m.ticks:options { stream = true }:remote(req.query.key)
  local a, b = s(), s:next()
  s:cancel()
  return { a, b, s:done(), s:next() == nil }
end
function CASES.timeout(self, req)
  local got = {}
  local ok, err = pcall(function()
    for v in self.m.ticks:options { stream = true, timeout_s = 0.2 }:remote(req.query.key) do
      got[#got + 1] = v
    end
  end)
  assert(not ok and serve.is_call_error(err), tostring(err))
  local out = failure(err)
  out.got = #got
  return out
end
function CASES.count(self, req)
  return self.m.count_twice:remote(req.query.key, 0.1):result()
end
function CASES.fails(self)
  local got = {}
  local ok, err = pcall(function()
    for v in self.m.fails:options { stream = true }:remote(2) do got[#got + 1] = v end
  end)
  assert(not ok and serve.is_call_error(err), tostring(err))
  local out = failure(err)
  out.got = got
  return out
end
function CASES.plain(self)
  local ok, err = pcall(function()
    for _ in self.m.plain:options { stream = true }:remote(1) do end
  end)
  assert(not ok and serve.is_call_error(err), tostring(err))
  return failure(err)
end
function CASES.big(self, req)
  local n, size = tonumber(req.query.n), tonumber(req.query.size)
  local items, parts = 0, {}
  for v in self.m.big:options { stream = true }:remote(n, size) do
    items = items + 1
    parts[#parts + 1] = v
  end
  return serve.response { body = table.concat(parts), headers = { ["X-Items"] = items } }
end
function CASES.raw(self, req)
  local parts = {}
  for chunk in self.m:options { stream = true }:remote(req) do parts[#parts + 1] = chunk end
  return table.concat(parts)
end
function CASES.sse_format()
  return serve.sse(function(send)
    send("one")
    send { data = "a\nb\r\nc\rd", event = "update", id = 7, retry = 1500 }
    send { comment = "keep-alive" }
    send { data = { x = 1 } }
    send { data = "" }
  end, { headers = { ["cache-control"] = "no-store" } })
end
function CASES.sse_bad()
  local out = {}
  for _, ev in ipairs { { id = "a\nb" }, { event = "x\ry" }, { nope = 1 }, {}, 42,
                        { retry = 1.5 }, { data = "x", id = "a\0b" } } do
    local ok, err = pcall(serve.sse_event, ev)
    out[#out + 1] = ok and "accepted" or tostring(err)
  end
  return out
end

function Front:__call(req)
  return CASES[req.path:match("^/s/([%w_]+)")](self, req)
end

local model = Model:bind()
return { app = Front:bind(model, Relay:bind(model)) }
'''

APPS = [{"name": "s", "route_prefix": "/s", "import_path": "streams.lua:app"}]


def read_until(sock, buf, needle):
    """Reads from sock until needle is in buf (bounded by the socket's timeout)."""
    while needle not in buf:
        d = sock.recv(65536)
        if not d:
            break
        buf += d
    return buf


def Producer(test, key):
    """The Model's tick counter for one key, read through the front."""
    return harness.SideEffect(test, "/s/count?key=" + key)


class HandleStreamTest(harness.ServerTestCase):
    APPLICATIONS = APPS
    FILES = {"streams.lua": STREAMS_LUA}

    def call(self, path, **kw):
        r = self.server.get(path, **kw)
        self.assertEqual(r.status, 200, r)
        return r

    def test_values_arrive_in_order_with_their_types(self):
        got = self.call("/s/values?n=50").json()
        self.assertEqual(got["n"], 52, got)
        self.assertEqual(got["first"], {"i": 1, "s": "tok1", "f": 1.25, "list": [1, True]}, got)
        self.assertEqual(got["last"]["i"], 50, got)
        self.assertTrue(got["big"] and got["false_kept"] and got["bin_ok"], got)

    def test_first_item_reaches_the_client_while_the_producer_waits(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/s/sse_gated?key=g1"))
            first = read_until(s, b"", b"data: first\n\n")
            self.assertIn(b"event: token\ndata: first\n\n", first)
            self.assertIn(b"text/event-stream", first.lower())
            self.assertNotIn(b"second", first)
            self.assertEqual(self.call("/s/release?key=g1").body, b"released")
            rest = read_until(s, first, b"0\r\n\r\n")
        finally:
            s.close()
        self.assertIn(b"event: token\ndata: second\n\n", rest)
        self.assertIn(b"event: token\ndata: third\n\n", rest)

    def test_error_mid_stream_after_the_items_before_it(self):
        got = self.call("/s/fails").json()
        self.assertEqual(got["got"], [1, 2], got)
        self.assertEqual(got["kind"], "failed", got)
        self.assertEqual(got["deployment"], "Model", got)
        self.assertEqual(got["method"], "fails", got)
        self.assertEqual(got["message"], "model broke after 2", got)
        self.assertIn("s/Model.fails", got["text"], got)

    def test_a_method_without_a_stream_is_a_clear_error(self):
        got = self.call("/s/plain").json()
        self.assertEqual(got["kind"], "failed", got)
        self.assertIn("s/Model.plain did not return serve.stream", got["message"], got)

    def test_large_stream_arrives_whole(self):
        n, size = 64, 65536  # 4 MiB: above the reader's 256 KiB high-water mark many times
        r = self.call("/s/big?n=%d&size=%d" % (n, size), timeout=30)
        self.assertEqual(r.header("x-items"), str(n))
        want = b"".join(bytes([65 + i % 26]) * size for i in range(1, n + 1))
        self.assertEqual(len(r.body), len(want))
        self.assertEqual(hashlib.sha256(r.body).hexdigest(), hashlib.sha256(want).hexdigest())

    def test_forwarded_request_streams_its_raw_body(self):
        self.assertEqual(self.call("/s/raw").body, b"raw-1;raw-2;/s/raw")

    def test_client_disconnect_stops_the_producer_two_hops_down(self):
        p = Producer(self, "gone")
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/s/sse_ticks?key=gone"))
            got = read_until(s, b"", b"data: t3;\n\n")
            # one event per chunk, in order
            self.assertLess(got.index(b"data: t1;\n\n"), got.index(b"data: t2;\n\n"), got)
        finally:
            s.close()
        p.assert_stops()

    def test_cancel_stops_the_producer(self):
        p = Producer(self, "cancel")
        self.assertEqual(self.call("/s/cancel_after?key=cancel").json(),
                         ["t1;", "t2;", True, True])
        p.assert_stops()

    def test_handle_timeout_ends_the_stream_and_its_producer(self):
        p = Producer(self, "late")
        got = self.call("/s/timeout?key=late").json()
        self.assertGreater(got["got"], 0, got)
        self.assertEqual(got["kind"], "timeout", got)
        self.assertEqual(got["deployment"], "Model", got)
        p.assert_stops()

    def test_sse_framing(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/s/sse_format"))
            r = HTTPReader(s).read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.chunked, r)
        self.assertEqual(r.header("content-type"), "text/event-stream; charset=utf-8")
        self.assertEqual(r.header("cache-control"), "no-store")
        self.assertEqual(r.header("x-accel-buffering"), "no")
        self.assertEqual(r.body, b"data: one\n\n"
                         b"event: update\nid: 7\nretry: 1500\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
                         b": keep-alive\n\n"
                         b'data: {"x":1}\n\n'
                         b"data: \n\n")

    def test_sse_refuses_what_would_break_the_framing(self):
        got = self.call("/s/sse_bad").json()
        self.assertEqual(len(got), 7, got)
        self.assertIn("id must be one line", got[0])
        self.assertIn("event must be one line", got[1])
        self.assertIn("unknown event field 'nope'", got[2])
        self.assertIn("an event needs data", got[3])
        self.assertIn("an event is a string or a table, got number", got[4])
        self.assertIn("retry must be a whole number", got[5])
        self.assertIn("id must be one line without NUL", got[6])


if __name__ == "__main__":
    harness.main()
