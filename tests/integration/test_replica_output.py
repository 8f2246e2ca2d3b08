"""Replica output is checked (issue 8, points 6 and 7):
 - a response header whose value holds CR or LF (or whose name is not a token) is refused with a
   500 JSON error carrying the request id, logged by the replica, and never reaches the client;
 - a 1xx status from a handler (whole or streamed) is refused with a 500: it is no final status;
 - a table key that is not UTF-8 fails the JSON encoding with a message naming its bytes;
 - serve.sleep(NaN) and serve.sleep(-1) are errors; serve.sleep(math.huge) sleeps until the
   request is cancelled;
 - ray_actor_options.memory caps a replica's Lua memory: a handler that allocates without bound
   gets a 500 saying so, and the same replica process serves the next request;
   default_replica_memory caps a deployment that sets none.
And two leftovers (point 9):
 - a controller killed with SIGKILL leaves its run folder; the next controller to start removes
   it (its owner process is gone), and never the folder of a controller still running;
 - a router script that fails to load stops `moonserve run` before the ingress opens, with the
   same error `moonserve check` reports."""

import os
import signal
import time
import unittest

import harness

OUT_LUA = r'''
local serve = require "moonserve"
local Out = serve.deployment { name = "Out" }

local function pid()
  local f = io.open("/proc/self/stat", "r")
  local s = f:read("*l"); f:close()
  return tonumber(s:match("^(%d+)"))
end

local routes = {
  crlf = function() return serve.response { headers = { ["x-a"] = "ok\r\nSet-Cookie: evil=1" },
                                            body = "x" } end,
  lf = function() return serve.response { headers = { ["x-a"] = "ok\nX-Evil: 1" }, body = "x" } end,
  ctl = function() return serve.response { headers = { ["x-a"] = "a\0b" }, body = "x" } end,
  tab = function() return serve.response { headers = { ["x-a"] = "a\tb" }, body = "x" } end,
  badname = function() return serve.response { headers = { ["x a:"] = "v" }, body = "x" } end,
  emptyname = function() return serve.response { headers = { [""] = "v" }, body = "x" } end,
  streamcrlf = function()
    return serve.stream(function(send) send("never") end,
                        { headers = { ["x-a"] = "1\r\nX-Evil: 1" } })
  end,
  interim = function() return serve.response { status = 101, body = "x" } end,
  interimstream = function()
    return serve.stream(function(send) send("never") end, { status = 103 })
  end,
  badkey = function() return { ["caf\255"] = 1 } end,
  goodkey = function() return { ["caf\195\169"] = 1 } end,
  sleepnan = function() serve.sleep(0 / 0); return "woke" end,
  sleepneg = function() serve.sleep(-1); return "woke" end,
  sleephuge = function() serve.sleep(math.huge); return "woke" end,
  sleepbig = function() serve.sleep(1e300); return "woke" end,
  hog = function()
    local t = {}
    for i = 1, math.huge do t[i] = string.rep("x", 1024) .. i end
  end,
  pid = function() return { pid = pid() } end,
}

function Out:__call(req)
  return routes[req.path:match("([^/]+)$")]()
end
return { app = Out:bind() }
'''

MIB = 1024 * 1024


def out_app(name, deployment=None):
    app = {"name": name, "route_prefix": "/" + name, "import_path": "out.lua:app"}
    if deployment:
        d = {"name": "Out"}
        d.update(deployment)
        app["deployments"] = [d]
    return app


class ReplicaOutputTest(harness.ServerTestCase):
    FILES = {"out.lua": OUT_LUA}
    HTTP_OPTIONS = {"request_timeout_s": 1.0}
    APPLICATIONS = [
        out_app("out", {"num_replicas": 1}),
        out_app("capped", {"num_replicas": 1, "ray_actor_options": {"memory": 32 * MIB}}),
    ]
    EXTRA_CONFIG = {"default_replica_memory": 48 * MIB}

    def refused(self, path, needle):
        r = self.server.get(path, headers={"X-Request-ID": "rid-" + path.split("/")[-1]})
        body = self.assertErrorJSON(r, 500)
        self.assertEqual(body["request_id"], "rid-" + path.split("/")[-1])
        self.assertIn(needle, body["error"], body)
        return r, body

    def assertLogged(self, text):
        ok = harness.wait_until(lambda: text in self.server.stderr_text(), 5)
        self.assertTrue(ok, "%r not in the log:\n%s" % (text, self.server.stderr_tail()))

    # -- headers ---------------------------------------------------------------------------

    def test_crlf_in_header_value_is_refused(self):
        r, body = self.refused("/out/crlf", "CR or LF")
        self.assertIsNone(r.header("set-cookie"), r)
        self.assertIsNone(r.header("x-a"), r)
        self.assertIn('"x-a"', body["error"])
        # logged by the replica, whose log prefix names it
        self.assertLogged("request rid-crlf failed: invalid response header")
        line = [ln for ln in self.server.stderr_text().splitlines() if "rid-crlf failed" in ln][0]
        self.assertIn("replica out/Out#", line)

    def test_bare_lf_in_header_value_is_refused(self):
        r, _ = self.refused("/out/lf", "CR or LF")
        self.assertIsNone(r.header("x-evil"), r)

    def test_control_character_in_value_is_refused(self):
        self.refused("/out/ctl", "control character")

    def test_tab_in_value_is_allowed(self):
        r = self.server.get("/out/tab")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-a"), "a\tb")

    def test_bad_header_names_are_refused(self):
        self.refused("/out/badname", "not allowed in a header name")
        self.refused("/out/emptyname", "empty name")

    def test_streamed_head_is_checked_too(self):
        r, _ = self.refused("/out/streamcrlf", "CR or LF")
        self.assertIsNone(r.header("x-evil"), r)

    def test_interim_status_cannot_end_a_response(self):
        # a 1xx is no final status: passed through it would leave the client waiting for the
        # real response (or parse the body as one)
        r, body = self.refused("/out/interim", "status 101")
        self.assertIn("final status (200-599)", body["error"])
        r, body = self.refused("/out/interimstream", "invalid status 103")

    # -- JSON keys -------------------------------------------------------------------------

    def test_non_utf8_key_is_an_error(self):
        _, body = self.refused("/out/badkey", "not valid UTF-8")
        self.assertIn("caf\\xff", body["error"])
        self.assertLogged("request rid-badkey failed")

    def test_utf8_key_is_kept(self):
        r = self.server.get("/out/goodkey")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"caf\u00e9": 1})

    # -- serve.sleep -----------------------------------------------------------------------

    def test_sleep_nan_and_negative_are_errors(self):
        self.refused("/out/sleepnan", "serve.sleep: bad duration (NaN)")
        self.refused("/out/sleepneg", "serve.sleep: bad duration (negative)")

    def test_sleep_forever_lasts_until_cancelled(self):
        for path in ("/out/sleephuge", "/out/sleepbig"):
            t0 = time.monotonic()
            r = self.server.get(path, timeout=10)
            waited = time.monotonic() - t0
            # request_timeout_s (1 s) ends it: it did not return at once
            self.assertEqual(r.status, 408, r)
            self.assertGreaterEqual(waited, 0.9, path)
        self.assertEqual(self.server.get("/out/pid").status, 200)

    # -- memory ----------------------------------------------------------------------------

    def hog_then_serve(self, app, limit_kib):
        before = self.server.get("/%s/pid" % app).json()["pid"]
        r = self.server.get("/%s/hog" % app, timeout=30)
        body = self.assertErrorJSON(r, 500)
        self.assertIn("not enough memory", body["error"], body)
        self.assertIn("memory limit of %d KiB" % limit_kib, body["error"], body)
        for _ in range(3):  # and again: the cap holds and the replica keeps serving
            r = self.server.get("/%s/pid" % app)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()["pid"], before)
        r = self.server.get("/%s/hog" % app, timeout=30)
        self.assertIn("not enough memory", self.assertErrorJSON(r, 500)["error"])
        self.assertEqual(self.server.get("/%s/pid" % app).json()["pid"], before)

    def test_actor_memory_caps_the_replica(self):
        self.hog_then_serve("capped", 32 * 1024)

    def test_engine_default_caps_a_replica_without_memory(self):
        self.hog_then_serve("out", 48 * 1024)


class RunFolderTest(unittest.TestCase):
    def run_dir(self, server):
        dirs = server.run_dirs()
        self.assertEqual(len(dirs), 1, dirs)
        self.assertTrue(os.path.isfile(os.path.join(dirs[0], "owner")), dirs)
        return dirs[0]

    def test_stale_run_folder_is_removed_at_start(self):
        app = [harness.hello_app()]
        killed = harness.start_server(self, app)
        live = harness.start_server(self, app)
        killed_dir, live_dir = self.run_dir(killed), self.run_dir(live)
        replicas = killed.snapshot_children()
        killed.send_signal(signal.SIGKILL)
        self.assertIsNotNone(killed.wait_exit(10))
        killed.stopped = True
        self.assertTrue(harness.wait_until(
            lambda: not any(harness.is_alive(*p) for p in replicas), 10))
        self.assertTrue(os.path.isdir(killed_dir), "kill -9 ran no cleanup: the test needs it")

        third = harness.start_server(self, app)
        self.assertFalse(os.path.exists(killed_dir), "the stale run folder is still there")
        self.assertIn("removed the stale run folder %s" % killed_dir, third.stderr_text())
        # the folder of a controller that still runs is kept, and it keeps serving
        self.assertTrue(os.path.isfile(os.path.join(live_dir, "owner")))
        self.assertEqual(live.get("/hello/x").status, 200)
        for s in (third, live):
            d = self.run_dir(s)
            s.stop()
            self.assertFalse(os.path.exists(d), "a clean stop removes its own run folder")


BAD_ROUTER_LUA = r'''
local R = {}
function R:choose_replicas( return {} end
return R
'''


class BadRouterAtStartTest(unittest.TestCase):
    def test_bad_router_stops_the_start_before_the_ingress_opens(self):
        app = harness.hello_app(deployment={
            "request_router_config": {"request_router_class": "bad_router.lua:R"}})
        srv = harness.start_server(self, [app], files={"bad_router.lua": BAD_ROUTER_LUA},
                                   wait=False)
        rc = srv.wait_exit(20)
        srv.stopped = True
        self.assertEqual(rc, 1, srv.stderr_tail())
        err = srv.stderr_text()
        self.assertIn("request_router_class: %s/bad_router.lua:3:" % srv.dir, err)
        self.assertNotIn("serving on", err)  # the ingress never opened
        self.assertEqual(srv.snapshot_children(), [])
        rc, out = harness.run_cli("check", srv.config_path)
        self.assertEqual(rc, 1, out)
        self.assertIn("request_router_class: %s/bad_router.lua:3:" % srv.dir, out)


if __name__ == "__main__":
    unittest.main()
