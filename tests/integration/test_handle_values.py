"""Handles pass Lua values (docs/lua-api.md, "Binding and handles"; the encoding is in
docs/replica-protocol.md): `handle:remote(a, b, ...)` reaches the callee's method with the same
values -- nil (also among and after the arguments), booleans, numbers bit-exact, binary strings,
nested tables with the array/object distinction -- and its return values come back the same way.
Values that cannot pass are an error at the call site; `handle.method:remote()` and
`handle:options{method_name=}` call a named method; a missing method is named in the error; the
HTTP ingress refuses the header that marks a handle call.

The Lua side describes every value it got (numbers as their 8 IEEE bytes, strings in hex, tables
with their kind), on both sides of the call, so Python compares exact descriptions."""

import http.client
import json
import os
import socket
import struct
import sys
import unittest

import harness
from harness import proc_cmdline

VALUES_LUA = r'''
local serve = require "moonserve"
local ffi = require "ffi"
local ARRAY_MT = getmetatable(serve.json.array())

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

-- An exact, JSON-friendly description of a Lua value.
local describe
describe = function(v)
  local t = type(v)
  if t == "nil" or t == "boolean" then
    return tostring(v)
  elseif t == "number" then
    if v ~= v then return "nan" end
    local d = ffi.new("double[1]", v)
    return "n:" .. hex(ffi.string(d, 8))
  elseif t == "string" then
    return "s:" .. hex(v)
  elseif v == serve.json.null then
    return "null"
  elseif t == "table" then
    local mt = getmetatable(v)
    if mt == ARRAY_MT then
      local items = {}
      for i = 1, #v do items[i] = describe(v[i]) end
      return { array = serve.json.array(items) }
    end
    local entries = {}
    for k, x in pairs(v) do entries[#entries + 1] = { describe(k), describe(x) } end
    table.sort(entries, function(a, b) return a[1] < b[1] end)
    return { map = serve.json.array(entries), plain = mt == nil }
  end
  return t
end

local function describe_all(...)
  local out = { n = select("#", ...) }
  local items = {}
  for i = 1, out.n do items[i] = describe((select(i, ...))) end
  out.values = serve.json.array(items)
  return out
end

local Callee = serve.deployment { name = "Callee" }
function Callee:__call(...) return describe_all(...) end
function Callee:echo(...) return ... end
function Callee:seen(...) return describe_all(...) end
function Callee:add(a, b) return a + b end
function Callee:remote() return "the method called remote" end
function Callee:bad_return() return { f = function() end } end
function Callee:same(s) return s end
function Callee:boom() error("callee exploded") end
Callee.double = serve.batch({ max_batch_size = 4, batch_wait_timeout_s = 0 }, function(self, items)
  local out = {}
  for i, x in ipairs(items) do out[i] = x * 2 end
  return out
end)
-- Written for the JSON-body handle calls of old: the one table argument still answers :json().
local Old = serve.deployment { name = "Old" }
function Old:__call(req) return { x = req:json().x, plain_json = req.json ~= nil } end

local Front = serve.deployment { name = "Front" }
function Front:init(c, old) self.c, self.old = c, old end

-- Runs fn in a protected call and returns what it raised (or "no error"). The functions passed
-- assign what they call (`local _ = ...`): a tail call would leave no caller position.
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  return ok and "no error" or tostring(err)
end

local CASES = {}

-- Argument lists by name: the count, then the values (so trailing nils count too).
local SAMPLES = {
  scalars = function()
    return 22, nil, true, false, 0, 1, -1, 127, 128, 2^53, -2^53, 2^53 + 2, -(2^53 + 2), 0.1,
           -0.0, 1 / 0, -1 / 0, 1e300, 5e-324, 0.5, -1234.5678, 2^63, 3
  end,
  strings = function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    return 3, "", "a\0b", table.concat(all)
  end,
  tables = function()
    return 9, { 1, 2, { 3, { 4 } } }, { a = 1, b = { c = "d" } }, {}, serve.json.array(),
           { [1] = "x", [3] = "z" }, { [2] = "b", [3] = "c" }, { 1, 2, x = 3 },
           { [true] = "t", [0.5] = "half", [-1] = "neg", [2^53] = "big" },
           { serve.json.null, { serve.json.null } }
  end,
  holes = function() return 6, nil, 1, nil, nil, "x", nil end,
  none = function() return 0 end,
}

function CASES.roundtrip(self, req)
  local function call(n, ...)
    local seen = self.c.seen:remote(...):result()
    local back = describe_all(self.c.echo:remote(...):result())
    return { seen = seen, back = back, sent_n = n }
  end
  return call(SAMPLES[req.query.sample]())
end

function CASES.call_default(self, req)
  -- handle:remote(...) calls __call with the same values
  return self.c:remote(1, nil, "two"):result()
end

function CASES.big(self, req)
  local s = string.rep("\0\1\2\255", 65536) .. "end" -- 256 KiB: the link splits it in BODY frames
  local t = {}
  for i = 1, 20000 do t[i] = { i = i, s = tostring(i), f = i + 0.25 } end
  local back_s = self.c.same:remote(s):result()
  local back_t = self.c.same:remote(t):result()
  local ok = #back_t == #t
  for i = 1, #t do
    local a, b = t[i], back_t[i]
    ok = ok and a.i == b.i and a.s == b.s and a.f == b.f
  end
  return { string_ok = back_s == s, string_len = #back_s, table_ok = ok }
end

function CASES.errors(self, req)
  local c = self.c
  local cyc = { a = {} }
  cyc.a.b = cyc
  return {
    fn = raised(function() local _ = c:remote(1, print) end),
    nested = raised(function()
      local _ = c.echo:remote({ x = { 1, 2, { f = function() end } } })
    end),
    thread = raised(function() local _ = c:remote(coroutine.create(print)) end),
    userdata = raised(function() local _ = c:remote(io.stdout) end),
    cdata = raised(function() local _ = c:remote(ffi.new("int", 1)) end),
    cycle = raised(function() local _ = c:remote(cyc) end),
    object = raised(function() local _ = c:remote(setmetatable({}, { __index = {} })) end),
    handle = raised(function() local _ = c:remote(c) end),
    request_to_method = raised(function() local _ = c.echo:remote(req) end),
    bad_return = raised(function() local _ = c.bad_return:remote():result() end),
    callee_error = raised(function() local _ = c.boom:remote():result() end),
    missing = raised(function() local _ = c.no_such_method:remote(1) end),
    missing_option = raised(function() local _ = c:options { method_name = "nope" }:remote() end),
    bind_is_no_method = raised(function() local _ = c.bind:remote() end),
    remote_with_dot = raised(function() local _ = c.remote(1) end),
  }
end

function CASES.methods(self, req)
  local c = self.c
  local a = c.add:remote(2, 3)
  local b = c:options { method_name = "add" }:remote(40, 2)
  local merged = c:options { method_name = "add" }:options { multiplexed_model_id = "m1" }
  local batched = { c.double:remote(1), c.double:remote(2), c.double:remote(21) }
  return {
    add = a:result(), add_again = a:result(), options_add = b:result(),
    merged = merged:remote(1, 1):result(),
    remote_method = c:options { method_name = "remote" }:remote():result(),
    batched = { batched[1]:result(), batched[2]:result(), batched[3]:result() },
    tostring = tostring(c.add),
  }
end

function CASES.options_errors(self, req)
  local c = self.c
  return {
    unknown = raised(function() local _ = c:options { colour = "red" } end),
    timeout = raised(function() local _ = c:options { timeout_s = -1 } end),
    stream = raised(function() local _ = c:options { stream = "yes" } end),
    stream_false = raised(function() local _ = c:options { stream = false }:remote():result() end),
    bad_name = raised(function() local _ = c:options { method_name = "not a name" } end),
    bad_model = raised(function() local _ = c:options { multiplexed_model_id = 7 } end),
    not_table = raised(function() local _ = c:options("add") end),
  }
end

function CASES.legacy(self, req)
  return self.old:remote({ x = 5 }):result()
end

function Front:__call(req)
  return CASES[req.path:match("^/v/([%w_]+)")](self, req)
end

-- A request forwarded through a handle arrives at __call as a request object, with the
-- serve_multiplexed_model_id header the option sets (routers read it).
local Fwd = serve.deployment { name = "Fwd" }
function Fwd:__call(req)
  return { path = req.path, body = req.body, model = req.headers["serve_multiplexed_model_id"],
           method_header = req.headers["x-moonserve-method"] or false }
end
local Front2 = serve.deployment { name = "Front2" }
function Front2:init(fwd) self.fwd = fwd end
function Front2:__call(req)
  return self.fwd:options { multiplexed_model_id = "model-7" }:remote(req):result()
end

return { app = Front:bind(Callee:bind(), Old:bind()), fwd = Front2:bind(Fwd:bind()) }
'''


def d(x):
    """The description VALUES_LUA gives a Python value (floats as their IEEE bytes)."""
    if x is None:
        return "nil"
    if x is True or x is False:
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        if x != x:
            return "nan"
        return "n:" + struct.pack("<d", float(x)).hex()
    if isinstance(x, bytes):
        return "s:" + x.hex()
    if isinstance(x, str):
        return "s:" + x.encode().hex()
    raise TypeError(x)


def arr(*items):
    return {"array": list(items)}


def obj(pairs, plain=True):
    return {"map": sorted(([d(k), v if isinstance(v, dict) else d(v)] for k, v in pairs),
                          key=lambda e: e[0]), "plain": plain}


class HandleValuesTest(harness.ServerTestCase):
    APPLICATIONS = [
        {"name": "v", "route_prefix": "/v", "import_path": "values.lua:app"},
        {"name": "f", "route_prefix": "/f", "import_path": "values.lua:fwd"},
    ]
    FILES = {"values.lua": VALUES_LUA}

    def call(self, path):
        r = self.server.get(path)
        self.assertEqual(r.status, 200, r)
        return r.json()

    def roundtrip(self, sample, expect):
        got = self.call("/v/roundtrip?sample=" + sample)
        self.assertEqual(got["sent_n"], len(expect))
        self.assertEqual(got["seen"], {"n": len(expect), "values": expect}, "callee side")
        self.assertEqual(got["back"], {"n": len(expect), "values": expect}, "return side")

    def test_scalars_are_exact(self):
        self.roundtrip("scalars", [
            "nil", "true", "false", d(0), d(1), d(-1), d(127), d(128), d(2 ** 53), d(-2 ** 53),
            d(2 ** 53 + 2), d(-(2 ** 53 + 2)), d(0.1), d(-0.0), d(float("inf")),
            d(float("-inf")), d(1e300), d(5e-324), d(0.5), d(-1234.5678), d(2 ** 63), d(3)])
        # -0.0 keeps its sign bit
        self.assertNotEqual(d(-0.0), d(0.0))

    def test_strings_are_binary_safe(self):
        self.roundtrip("strings", [d(b""), d(b"a\0b"), d(bytes(range(256)))])

    def test_tables_keep_their_shape(self):
        self.roundtrip("tables", [
            arr(d(1), d(2), arr(d(3), arr(d(4)))),
            obj([("a", 1), ("b", obj([("c", "d")]))]),
            obj([]),                           # a plain empty table travels as an object
            arr(),                             # serve.json.array() stays an empty array
            obj([(1, "x"), (3, "z")]),         # a hole: an object with integer keys
            obj([(2, "b"), (3, "c")]),         # does not start at 1: an object
            obj([(1, 1), (2, 2), ("x", 3)]),   # mixed keys: an object
            {"map": sorted([["true", d("t")], [d(0.5), d("half")], [d(-1), d("neg")],
                            [d(2 ** 53), d("big")]]), "plain": True},
            arr("null", arr("null")),
        ])

    def test_nil_holes_and_counts(self):
        self.roundtrip("holes", ["nil", d(1), "nil", "nil", d("x"), "nil"])
        self.roundtrip("none", [])

    def test_remote_calls_dunder_call_with_the_values(self):
        self.assertEqual(self.call("/v/call_default"),
                         {"n": 3, "values": [d(1), "nil", d("two")]})

    def test_large_values(self):
        self.assertEqual(self.call("/v/big"),
                         {"string_ok": True, "string_len": 4 * 65536 + 3, "table_ok": True})

    def test_errors_at_the_call_site(self):
        got = self.call("/v/errors")
        here = r"values\.lua:\d+: "
        self.assertRegex(got["fn"], here + r"handle:remote: call to Callee\.__call: argument 2: "
                                           r"cannot pass a function$")
        self.assertRegex(got["nested"], here + r"handle:remote: call to Callee\.echo: argument 1, "
                                               r"field \"x\", item 3, field \"f\": cannot pass "
                                               r"a function")
        self.assertRegex(got["thread"], here + r".*argument 1: cannot pass a thread")
        self.assertRegex(got["userdata"], here + r".*cannot pass a userdata \(only "
                                                 r"serve\.json\.null passes\)")
        self.assertRegex(got["cdata"], here + r".*cannot pass a cdata")
        self.assertRegex(got["cycle"], here + r".*argument 1, field \"a\", field \"b\": cannot "
                                              r"pass a table that contains itself \(a cycle\)")
        self.assertRegex(got["object"], here + r".*cannot pass a table with a metatable")
        self.assertRegex(got["handle"], here + r".*cannot pass a table with a metatable")
        self.assertRegex(got["request_to_method"], here + r".*argument 1: cannot pass a request "
                                                          r"object \(a request is forwarded only "
                                                          r"alone, to __call\)")
        self.assertRegex(got["bad_return"], r"call to v/Callee\.bad_return failed with status "
                                            r"500: .*Callee\.bad_return: return value 1, field "
                                            r".+f.+: cannot pass a function through a handle")
        self.assertRegex(got["callee_error"], r"call to v/Callee\.boom failed with status 500: "
                                              r".*callee exploded")
        self.assertRegex(got["missing"], here + r"handle:remote: deployment 'Callee' has no "
                                                r"method 'no_such_method'$")
        self.assertRegex(got["missing_option"], here + r".*deployment 'Callee' has no method "
                                                       r"'nope'")
        self.assertRegex(got["bind_is_no_method"], here + r".*has no method 'bind'")
        self.assertRegex(got["remote_with_dot"], here + r"remote must be called as "
                                                        r"handle:remote\(\.\.\.\)")

    def test_named_methods_and_options(self):
        got = self.call("/v/methods")
        self.assertEqual(got, {
            "add": 5, "add_again": 5, "options_add": 42, "merged": 2,
            "remote_method": "the method called remote", "batched": [2, 4, 42],
            "tostring": "handle(v/Callee.add)",
        })

    def test_options_errors(self):
        got = self.call("/v/options_errors")
        self.assertRegex(got["unknown"], r"values\.lua:\d+: handle:options: unknown or "
                                         r"unsupported option 'colour' \(supported: method_name, "
                                         r"multiplexed_model_id, timeout_s, stream\)")
        self.assertRegex(got["timeout"], r"timeout_s must be a number >= 0")
        self.assertRegex(got["stream"], r"values\.lua:\d+: handle:options: stream must be a boolean")
        self.assertEqual(got["stream_false"], "no error")
        self.assertRegex(got["bad_name"], r"method_name must be a method name")
        self.assertRegex(got["bad_model"], r"multiplexed_model_id must be a string")
        self.assertRegex(got["not_table"], r"handle:options expects a table")

    def test_request_forwarded_with_model_id(self):
        r = self.server.request("POST", "/f/some/where?q=1", body=b"raw\0body")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"path": "/f/some/where", "body": "raw\u0000body",
                                    "model": "model-7", "method_header": False})

    def test_table_argument_still_answers_json(self):
        self.assertEqual(self.call("/v/legacy"), {"x": 5, "plain_json": True})

    def test_clients_cannot_send_a_handle_call(self):
        r = self.server.request("POST", "/v/x", body=b"\x01\x00",
                                headers={"X-Moonserve-Method": "echo",
                                         "Content-Type": "application/x-moonserve-values"})
        body = self.assertErrorJSON(r, 400)
        self.assertIn("X-Moonserve-Method is reserved for handle calls", body["error"])
        # the connection stays usable: the next request on it is served
        bad = harness.build_request("POST", "/v/x", {"X-Moonserve-Method": "__call"}, b"\x00")
        first, second = self.server.raw(bad + harness.build_request("GET", "/v/call_default"),
                                        n_responses=2)
        self.assertEqual(first.status, 400, first)
        self.assertEqual(second.status, 200, second)

    def handle_socket(self):
        for pid in self.server.replica_pids():
            cmd = proc_cmdline(pid)
            if "--controller" in cmd[:-1]:
                return cmd[cmd.index("--controller") + 1]
        self.fail("no replica names the handle socket")

    def raw_handle_call(self, method, body):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.handle_socket())
        try:
            head = ("POST / HTTP/1.1\r\nHost: moonserve\r\nX-Moonserve-Target: v/Callee\r\n"
                    "X-Moonserve-Method: %s\r\nContent-Type: application/x-moonserve-values\r\n"
                    "Content-Length: %d\r\nConnection: close\r\n\r\n" % (method, len(body)))
            s.sendall(head.encode() + body)
            return harness.HTTPReader(s).read_response()
        finally:
            s.close()

    def test_callee_checks_method_and_payload(self):
        # A caller whose code differs from the callee's (or a hand-made call) is answered by the
        # callee itself: 404 naming the deployment and the method, 400 for a bad payload.
        r = self.raw_handle_call("nope", b"\x00")
        self.assertEqual(r.status, 404, r)
        self.assertEqual(r.json()["error"], "deployment 'Callee' has no method 'nope'")
        for bad, why in [(b"", "truncated"), (b"\x02\x63", "count larger than the payload"),
                         (b"\x01\x63", "unknown tag 99"), (b"\x01\x02\x02", "left-over"),
                         (b"\x01\x06\x05ab", "count larger than the payload"),
                         (b"\x01\x05\x00\x00", "truncated"),
                         (b"\x01\x03" + b"\x80" * 8 + b"\x01", "varint too long"),
                         (b"\x01\x07\x01\x00", "nil in an array"),
                         (b"\x01\x08\x01\x00\x02", "nil or NaN key"),
                         (b"\x01" + b"\x07\x01" * 101 + b"\x02", "nested too deep")]:
            r = self.raw_handle_call("echo", bad)
            self.assertEqual(r.status, 400, (bad, r))
            self.assertIn("malformed handle value payload: " + why, r.json()["error"], bad)
        # the documented encoding, by hand: add(300, 5)
        r = self.raw_handle_call("add", b"\x02\x03\xac\x02\x03\x05")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("content-type"), "application/x-moonserve-values")
        self.assertEqual(r.body, b"\x01\x03\xb1\x02")  # one value: 305


PROCESS_LUA = r'''
local serve = require "moonserve"
local Model = serve.deployment { name = "Model", process = {
  command = { PYTHON, SERVER }, ready_path = "/health" } }
local Ingress = serve.deployment { name = "Ingress" }
function Ingress:init(model) self.model = model end
local function raised(fn)
  local ok, err = pcall(fn)
  return ok and "no error" or tostring(err)
end
function Ingress:__call(req)
  local m = self.model
  return {
    table = m:options { multiplexed_model_id = "m2" }:remote({ a = 1 }):result(),
    string = m:remote("hi"):result(),
    none = m:remote():result(),
    method = raised(function() local _ = m.predict:remote(1) end),
    two = raised(function() local _ = m:remote(1, 2) end),
    number = raised(function() local _ = m:remote(1) end),
  }
end
return { app = Ingress:bind(Model:bind()) }
'''


class ProcessDeploymentTest(unittest.TestCase):
    """A process deployment speaks HTTP: a handle to it keeps sending requests (a table as a
    JSON body, a string as a text body) and refuses methods and several arguments."""

    def test_process_deployment_gets_http(self):
        echo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "procs", "echo_server.py")
        lua = PROCESS_LUA.replace("PYTHON", json.dumps(sys.executable)).replace(
            "SERVER", json.dumps(echo))
        srv = harness.start_server(self, [{"name": "p", "route_prefix": "/",
                                           "import_path": "p.lua:app"}], files={"p.lua": lua})
        srv.wait_status("p", "Model", lambda d: d["status"] == "HEALTHY", timeout=20)
        r = srv.get("/")
        self.assertEqual(r.status, 200, r)
        got = r.json()

        def headers(x):
            return {k.lower(): v for k, v in x["headers"]}
        t = got["table"]
        self.assertEqual((t["method"], t["path"], t["body_len"]), ("POST", "/", len('{"a":1}')))
        self.assertEqual(headers(t)["content-type"], "application/json")
        self.assertEqual(headers(t)["serve_multiplexed_model_id"], "m2")
        self.assertNotIn("x-moonserve-method", headers(t))
        self.assertEqual(headers(got["string"])["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(got["string"]["body_len"], 2)
        self.assertEqual(got["none"]["body_len"], 0)
        self.assertRegex(got["method"], r"p\.lua:\d+: handle:remote: Model is a process "
                                        r"deployment: it has no methods \(method 'predict'\)")
        self.assertRegex(got["two"], r"p\.lua:\d+: .*takes one argument .*got 2")
        self.assertRegex(got["number"], r"p\.lua:\d+: .*takes a request, a string, a table or "
                                        r"nil, got number")


if __name__ == "__main__":
    unittest.main()
