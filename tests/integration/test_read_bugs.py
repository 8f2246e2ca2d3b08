"""Bugs found by reading the code (issue 7, point 7), each pinned by a test:
 - a constructor error that is not valid UTF-8 (or is cut inside a character) still reaches the
   status document as DEPLOY_FAILED and the 503 body as JSON, with the bad bytes replaced;
 - application, deployment and route names with quotes, backslashes and newlines come out
   escaped in /-/routes (JSON) and /metrics (Prometheus label values);
 - repeated deploys do not keep old configs alive;
 - a Lua error while a handle call builds its request head fails the call cleanly;
 - header names longer than 255 bytes reach the handler whole (up to max_header_bytes)."""

import os
import re
import unittest

import harness
from harness import build_request, hello_app, HTTPReader

FAST_STOP = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 3}

# \233 and \255 are not UTF-8 on their own; error(..., 0) keeps the position out of the text.
BAD_BYTES_LUA = r'''
local serve = require "moonserve"
local Bad = serve.deployment { name = "Bad" }
function Bad:init() error("caf\233 \255 broken", 0) end
function Bad:__call(req) return "never" end
return { app = Bad:bind() }
'''

# 2 + 2 * 400 bytes: every fixed-size message buffer on the way cuts it inside an "é".
LONG_ERROR_LUA = r'''
local serve = require "moonserve"
local Long = serve.deployment { name = "Long" }
function Long:init() error("XY" .. string.rep("\195\169", 400), 0) end
function Long:__call(req) return "never" end
return { app = Long:bind() }
'''


def failed_dep(server, app, dep):
    return server.wait_status(app, dep, lambda d: d.get("status") == "DEPLOY_FAILED",
                              timeout=20, what="DEPLOY_FAILED")


class BadConstructorTextTest(harness.ServerTestCase):
    FILES = {"badbytes.lua": BAD_BYTES_LUA, "longerr.lua": LONG_ERROR_LUA}
    APPLICATIONS = [
        {"name": "badbytes", "route_prefix": "/badbytes", "import_path": "badbytes.lua:app"},
        {"name": "longerr", "route_prefix": "/longerr", "import_path": "longerr.lua:app"},
    ]

    def test_invalid_utf8_error_reports_deploy_failed(self):
        dep = failed_dep(self.server, "badbytes", "Bad")
        self.assertEqual(dep["status_trigger"], "REPLICA_STARTUP_FAILED", dep)
        self.assertEqual(dep["message"], "replicas fail to start: caf? ? broken", dep)
        r = self.server.get("/badbytes/x", timeout=15)
        body = self.assertErrorJSON(r, 503)
        self.assertIn("caf? ? broken", body["error"], body)

    def test_error_cut_inside_a_character_stays_valid(self):
        dep = failed_dep(self.server, "longerr", "Long")
        msg = dep["message"]
        self.assertTrue(msg.startswith("replicas fail to start: XYéé"), msg)
        self.assertNotIn("?", msg, "a cut must drop the whole character, not leave half")
        r = self.server.get("/longerr/x", timeout=15)
        body = self.assertErrorJSON(r, 503)
        self.assertIn("XYéé", body["error"], body)
        self.assertNotIn("?", body["error"], body)


# A deployment whose name needs escaping in every output format.
WEIRD_DEP = 'D"ep\\1'
WEIRD_LUA = r'''
local serve = require "moonserve"
local D = serve.deployment { name = 'D"ep\\1' }
function D:__call(req) return "weird" end
return { app = D:bind() }
'''
WEIRD_APP = 'we"ird\\app\nname'
WEIRD_PREFIX = '/q"uo\\te'

LABEL_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE_RE = re.compile(r'^([a-z_]+)(?:\{((?:[a-z_0-9]+=%s,?)*)\})? (\S+)$' % LABEL_VALUE)
LABEL_RE = re.compile(r'([a-z_0-9]+)=%s' % LABEL_VALUE)


def unescape_label(v):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse_prometheus(text):
    """Samples as (name, {label: value}, value); fails on a line the text format rejects."""
    out = []
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise AssertionError("not a valid Prometheus sample line: %r" % line)
        labels = {k: unescape_label(v) for k, v in LABEL_RE.findall(m.group(2) or "")}
        out.append((m.group(1), labels, m.groups()[-1]))
    return out


class EscapedNamesTest(harness.ServerTestCase):
    FILES = {"weird.lua": WEIRD_LUA}
    APPLICATIONS = [
        {"name": WEIRD_APP, "route_prefix": WEIRD_PREFIX, "import_path": "weird.lua:app",
         "deployments": [{"name": WEIRD_DEP, "num_replicas": 1}]},
        hello_app("hello", "/hello", {"num_replicas": 1}),
    ]

    def test_routes_json_escapes_prefix_and_name(self):
        r = self.server.get("/-/routes")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {WEIRD_PREFIX: WEIRD_APP, "/hello": "hello"})

    def test_metrics_escape_label_values(self):
        self.server.wait_status(WEIRD_APP, WEIRD_DEP, lambda d: d.get("status") == "HEALTHY",
                                timeout=15, what="HEALTHY")
        r = self.server.admin_request("GET", "/metrics")
        self.assertEqual(r.status, 200, r)
        samples = parse_prometheus(r.body.decode("utf-8"))
        target = [lab for name, lab, _ in samples
                  if name == "moonserve_deployment_target_replicas"]
        self.assertIn({"application": WEIRD_APP, "deployment": WEIRD_DEP}, target, target)
        self.assertIn({"application": "hello", "deployment": "Hello"}, target, target)
        infos = [lab for name, lab, _ in samples if name == "moonserve_script_info"]
        self.assertTrue(any(lab.get("application") == WEIRD_APP and
                            lab.get("deployment") == WEIRD_DEP for lab in infos), infos)


def config_gauge(server, name):
    r = server.admin_request("GET", "/metrics")
    if r.status != 200:
        raise AssertionError("GET /metrics -> %r" % r)
    text = r.body.decode("utf-8")
    for sample, labels, value in parse_prometheus(text):
        if sample == name and not labels:
            return float(value)
    raise AssertionError("no %s in /metrics:\n%s" % (name, text[:2000]))


class RepeatedDeployTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", dict(num_replicas=1, **FAST_STOP))]
    DEPLOYS = 200

    def test_deploys_do_not_keep_old_configs(self):
        srv = self.server
        held = config_gauge(srv, "moonserve_controller_configs_held")
        self.assertEqual(held, 1, "at start only the file's config is held")
        for i in range(self.DEPLOYS):
            apps = [hello_app("hello", "/hello", dict(num_replicas=1, user_config={"n": i},
                                                      **FAST_STOP))]
            cfg = {"http_options": srv.http_options,
                   "admin": {"host": srv.host, "port": srv.admin_port},
                   "applications": apps}
            r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
            self.assertEqual(r.status, 200, r)
        # the file's config (owned by the caller) and the latest deploy's, nothing more
        self.assertLessEqual(config_gauge(srv, "moonserve_controller_configs_held"), 2)
        self.assertEqual(srv.get("/hello/x").status, 200)


# core.call with a headers argument that is not a table raises inside the C function that
# builds the request head; it used to do so after the head buffer was allocated. Header lists may
# hold numbers (sent as their text): converting them allocates, which may raise too.
BAD_CALL_LUA = r'''
local serve = require "moonserve"
local core = require "moonserve.core"
local Caller = serve.deployment { name = "Caller" }
function Caller:__call(req)
  if req.path:find("numbers") then
    local fut = core.call("hello/Hello", "GET", "/x", { "x-num", 42, 7, "seven" }, "")
    core.wait(fut, 1)
    local status, ctype, body = core.result(fut)
    return { status = status, headers = serve.json.decode(body).headers }
  end
  if req.path:find("stream") then
    core.stream_start(200, { "x-num", 42, "x-skipped", {}, "content-type", "text/plain" })
    core.stream_send("streamed")
    return
  end
  local ok, err = pcall(core.call, "hello/Hello", "GET", "/", "not a table", "")
  return { ok = ok, err = tostring(err) }
end
return { app = Caller:bind() }
'''


class HeadBuildErrorTest(harness.ServerTestCase):
    """Run with the sanitizer build, a leaked head buffer is a LeakSanitizer report in the
    replica's stderr, which fails the teardown. Leak checks are on for this server even where
    the suite turns them off (the replicas here leak nothing else)."""
    FILES = {"badcall.lua": BAD_CALL_LUA}
    APPLICATIONS = [
        {"name": "badcall", "route_prefix": "/badcall", "import_path": "badcall.lua:app",
         "deployments": [{"name": "Caller", "num_replicas": 1}]},
        hello_app("hello", "/hello", {"num_replicas": 1}),
    ]

    @classmethod
    def setUpClass(cls):
        saved = os.environ.get("ASAN_OPTIONS")
        os.environ["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0"
        try:
            super().setUpClass()
        finally:
            if saved is None:
                del os.environ["ASAN_OPTIONS"]
            else:
                os.environ["ASAN_OPTIONS"] = saved

    def test_lua_error_while_building_a_call_head(self):
        for _ in range(50):
            r = self.server.get("/badcall/x", timeout=10)
            self.assertEqual(r.status, 200, r)
            body = r.json()
            self.assertFalse(body["ok"], body)
            self.assertIn("table expected", body["err"], body)

    def test_numbers_in_a_call_header_list(self):
        r = self.server.get("/badcall/numbers", timeout=10)
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["status"], 200, body)
        self.assertEqual(body["headers"].get("x-num"), "42", body)
        self.assertEqual(body["headers"].get("7"), "seven", body)

    def test_numbers_and_junk_in_a_stream_header_list(self):
        r = self.server.get("/badcall/stream", timeout=10)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"streamed")
        self.assertEqual(r.header("x-num"), "42", r)
        self.assertIsNone(r.header("x-skipped"), r)


class LongHeaderNameTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 1})]
    HTTP_OPTIONS = {"max_header_bytes": 16384}

    def send(self, headers):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/x", headers=headers))
            return HTTPReader(s).read_response()
        finally:
            s.close()

    def test_long_name_reaches_handler_whole(self):
        name = "X-" + "Long" * 200  # 802 bytes
        r = self.send({name: "v1"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["headers"].get(name.lower()), "v1", list(r.json()["headers"]))

    def test_two_long_names_with_a_common_prefix_stay_apart(self):
        a, b = "X-" + "a" * 300 + "-one", "X-" + "a" * 300 + "-two"
        r = self.send({a: "1", b: "2"})
        self.assertEqual(r.status, 200, r)
        got = r.json()["headers"]
        self.assertEqual((got.get(a.lower()), got.get(b.lower())), ("1", "2"), list(got))

    def test_name_over_the_header_limit_is_431(self):
        r = self.send({"X-" + "n" * 20000: "v"})
        self.assertEqual(r.status, 431, r)


if __name__ == "__main__":
    unittest.main()
