"""logging_config (docs/logging.md): TEXT or JSON lines from the controller and every replica,
log_level and encoding per deployment over the application's over the top level, and access
lines per HTTP request (request id, application, deployment, replica, method, route, status,
latency) that enable_access_log turns off per deployment."""

import json
import unittest

import harness
from harness import start_server, wait_until

LOUD_LUA = r'''
local serve = require "moonserve"
local Loud = serve.deployment { name = "Loud" }
function Loud:__call(req)
  serve.log.debug("debug line from %s", serve.get_replica_context().deployment)
  serve.log.info("info line from %s", serve.get_replica_context().deployment)
  if req.query.sleep then serve.sleep(tonumber(req.query.sleep)) end
  return "ok"
end
return { app = Loud:bind() }
'''


def app(name, prefix, logging=None, dep_logging=None):
    a = {"name": name, "route_prefix": prefix, "import_path": "loud.lua:app"}
    if logging:
        a["logging_config"] = logging
    if dep_logging:
        a["deployments"] = [{"name": "Loud", "logging_config": dep_logging}]
    return a


class LoggingTest(unittest.TestCase):
    def start(self, apps, top=None):
        extra = {"logging_config": top} if top else None
        return start_server(self, apps, files={"loud.lua": LOUD_LUA}, extra_config=extra)

    def access_lines(self, srv):
        return [l for l in srv.stderr_text().splitlines() if " access request_id=" in l
                or '"message": "access"' in l]

    def test_json_lines_from_controller_and_replicas(self):
        srv = self.start([app("a", "/a")], top={"encoding": "JSON"})
        r = srv.get("/a/x", headers={"X-Request-ID": "rid-json-1"})
        self.assertEqual(r.status, 200)
        self.assertTrue(wait_until(lambda: "rid-json-1" in srv.stderr_text()
                                   and "info line from Loud" in srv.stderr_text(), 10))
        records = []
        for line in srv.stderr_text().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                self.fail("not a JSON line: %r" % line)
        for rec in records:
            self.assertEqual({"time", "level", "role", "pid", "message"} - set(rec), set(), rec)
        roles = {rec["role"] for rec in records}
        self.assertIn("controller", roles)
        self.assertTrue(any(r.startswith("replica a/Loud#") for r in roles), roles)
        access = [rec for rec in records if rec["message"] == "access"
                  and rec["request_id"] == "rid-json-1"]
        self.assertEqual(len(access), 1, access)
        a = access[0]
        self.assertEqual((a["request_id"], a["application"], a["deployment"], a["method"],
                          a["route"], a["status"]), ("rid-json-1", "a", "Loud", "GET", "/a", 200))
        self.assertTrue(a["replica"].startswith("Loud#"), a)
        self.assertGreater(a["latency_ms"], 0)

    def test_text_access_lines_and_their_switch(self):
        srv = self.start([app("on", "/on"), app("off", "/off", dep_logging={
            "enable_access_log": False})])
        self.assertEqual(srv.get("/on/x", headers={"X-Request-ID": "rid-on"}).status, 200)
        self.assertEqual(srv.get("/off/x", headers={"X-Request-ID": "rid-off"}).status, 200)
        self.assertEqual(srv.get("/nowhere", headers={"X-Request-ID": "rid-404"}).status, 404)
        # Health probes have access lines too: wait for the two this test made.
        self.assertTrue(wait_until(lambda: all(any(rid in l for l in self.access_lines(srv))
                                               for rid in ("rid-on", "rid-404")), 10),
                        srv.stderr_tail())
        lines = self.access_lines(srv)
        on = [l for l in lines if "rid-on" in l]
        self.assertEqual(len(on), 1, lines)
        self.assertRegex(on[0], r' INFO \[controller \d+\] access request_id="rid-on" '
                                r'application="on" deployment="Loud" replica="Loud#\w+" '
                                r'method="GET" route="/on" status=200 latency_ms=\d+\.\d{3}$')
        self.assertFalse([l for l in lines if "rid-off" in l], lines)
        self.assertRegex([l for l in lines if "rid-404" in l][0],
                         r'application="" deployment="" replica="" method="GET" route="" '
                         r'status=404')

    def test_a_client_that_leaves_is_logged_as_a_disconnection(self):
        srv = self.start([app("a", "/a")])
        s = srv.connect()
        s.sendall(harness.build_request("GET", "/a/x?sleep=30", {"X-Request-ID": "rid-gone"}))
        self.assertTrue(wait_until(lambda: "info line from Loud" in srv.stderr_text(), 10))
        s.close()
        self.assertTrue(wait_until(lambda: [l for l in self.access_lines(srv)
                                            if "rid-gone" in l], 10), srv.stderr_tail())
        line = [l for l in self.access_lines(srv) if "rid-gone" in l][0]
        self.assertIn("status=disconnection", line)

    def test_levels_and_encodings_per_deployment(self):
        srv = self.start([app("quiet", "/quiet"),
                          app("loud", "/loud", logging={"log_level": "DEBUG"}),
                          app("json", "/json", logging={"log_level": "DEBUG"},
                              dep_logging={"encoding": "JSON", "log_level": "INFO"})],
                         top={"log_level": "INFO"})
        for prefix in ("/quiet", "/loud", "/json"):
            self.assertEqual(srv.get(prefix + "/x").status, 200)
        self.assertTrue(wait_until(lambda: srv.stderr_text().count("info line from Loud") == 3,
                                   10), srv.stderr_tail())
        text = srv.stderr_text()
        debug = [l for l in text.splitlines() if "debug line from" in l]
        self.assertEqual(len(debug), 1, debug)
        self.assertIn("[replica loud/Loud#", debug[0])
        json_lines = [json.loads(l) for l in text.splitlines() if l.startswith("{")]
        self.assertEqual([(r["level"], r["message"]) for r in json_lines
                          if "line from" in r["message"]], [("INFO", "info line from Loud")])
        self.assertTrue(all(r["role"].startswith("replica json/Loud#") for r in json_lines))


if __name__ == "__main__":
    harness.main()
