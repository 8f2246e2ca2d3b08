"""logging_config.logs_dir (docs/logging.md, "Log files"): the controller writes
DIR/controller.log (its own lines and the access lines) and every replica its own
DIR/replica_APP_DEPLOYMENT_ID.log, in the configured encoding, while stderr keeps getting every
line (unless MOONSERVE_LOG_TO_STDERR=0); files rotate by size (FILE.1 newest, at most
rotation_backup_count kept, no file past rotation_max_bytes but for a single longer line); a
logs_dir that cannot hold files is a config error at its position, at start and on a deploy; a
redeploy moves the files, per deployment where a deployment sets its own folder."""

import json
import os
import re
import tempfile

import harness
from harness import run_cli, start_server, wait_until

LOUD_LUA = r'''
local serve = require "moonserve"
local Loud = serve.deployment { name = "Loud" }
function Loud:__call(req)
  serve.log.info("info line from %s for %s", serve.get_replica_context().deployment,
                 req.query.tag or "-")
  return "ok"
end
return { app = Loud:bind() }
'''

REPLICA_FILE = re.compile(r"^replica_a_Loud_(\d+)\.log$")


def app(logging=None, dep_logging=None):
    a = {"name": "a", "route_prefix": "/a", "import_path": "loud.lua:app"}
    if logging:
        a["logging_config"] = logging
    if dep_logging:
        a["deployments"] = [{"name": "Loud", "logging_config": dep_logging}]
    return a


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def replica_files(folder):
    try:
        return sorted(n for n in os.listdir(folder) if REPLICA_FILE.match(n))
    except FileNotFoundError:
        return []


def all_text(folder):
    """Every file in folder, rotated ones included, as one text."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return ""
    return "".join(read(os.path.join(folder, n)) for n in sorted(names))


class LogFilesTest(harness.unittest.TestCase):
    def start(self, apps, top=None, env=None):
        srv = start_server(self, apps, files={"loud.lua": LOUD_LUA},
                           extra_config={"logging_config": top} if top else None, env=env)
        return srv

    def folder(self, srv, name="logs"):
        return os.path.join(srv.dir, name)

    def test_files_hold_controller_and_replica_lines(self):
        # An absolute folder that does not exist yet: the controller makes it and its parent.
        tmp = tempfile.TemporaryDirectory(prefix="moonserve-logs-")
        self.addCleanup(tmp.cleanup)
        logs = os.path.join(tmp.name, "var", "logs")
        srv2 = self.start([app()], top={"logs_dir": logs})
        self.assertEqual(srv2.get("/a/x?tag=t1", headers={"X-Request-ID": "rid-file-1"}).status,
                         200)
        ctl = os.path.join(logs, "controller.log")
        self.assertTrue(wait_until(lambda: "rid-file-1" in read(ctl) and any(
            "info line from Loud for t1" in read(os.path.join(logs, n))
            for n in replica_files(logs)), 10), (os.listdir(logs), srv2.stderr_tail()))
        ctl_lines = read(ctl).splitlines()
        self.assertTrue(ctl_lines)
        for line in ctl_lines:
            self.assertRegex(line, r"^\S+Z (DEBUG|INFO|WARN|ERROR) \[controller \d+\] ")
        access = [l for l in ctl_lines if 'request_id="rid-file-1"' in l]
        self.assertEqual(len(access), 1, ctl_lines)
        self.assertIn('application="a" deployment="Loud"', access[0])
        self.assertTrue(any("replica Loud#" in l and "ready" in l for l in ctl_lines), ctl_lines)
        names = replica_files(logs)
        self.assertEqual(len(names), 1, names)
        rid = REPLICA_FILE.match(names[0]).group(1)
        rep_lines = read(os.path.join(logs, names[0])).splitlines()
        for line in rep_lines:
            self.assertRegex(line, r"^\S+Z \w+ \[replica a/Loud#%s \d+\] " % rid)
        self.assertTrue(any("info line from Loud for t1" in l for l in rep_lines), rep_lines)
        # stderr still gets every line.
        err = srv2.stderr_text()
        self.assertIn("rid-file-1", err)
        self.assertIn("info line from Loud for t1", err)

    def test_json_encoding_in_files(self):
        # A folder relative to the config file's.
        srv = self.start([app()], top={"encoding": "JSON", "logs_dir": "rel/"})
        logs = self.folder(srv, "rel")
        self.assertEqual(srv.get("/a/x?tag=j", headers={"X-Request-ID": "rid-json-f"}).status,
                         200)
        ctl = os.path.join(logs, "controller.log")
        self.assertTrue(wait_until(lambda: "rid-json-f" in read(ctl) and replica_files(logs)
                                   and "for j" in read(os.path.join(logs, replica_files(logs)[0])),
                                   10), srv.stderr_tail())
        records = {}
        for name in ["controller.log"] + replica_files(logs):
            records[name] = []
            for line in read(os.path.join(logs, name)).splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    self.fail("%s: not a JSON line: %r" % (name, line))
                self.assertEqual({"time", "level", "role", "pid", "message"} - set(rec), set())
                records[name].append(rec)
        self.assertEqual({r["role"] for r in records["controller.log"]}, {"controller"})
        access = [r for r in records["controller.log"] if r["message"] == "access"
                  and r["request_id"] == "rid-json-f"]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["status"], 200)
        rep = records[replica_files(logs)[0]]
        self.assertTrue(all(r["role"].startswith("replica a/Loud#") for r in rep), rep)
        self.assertIn("info line from Loud for j", [r["message"] for r in rep])

    def check_rotated(self, folder, base, limit, backups):
        """FILE, FILE.1 .. FILE.backups at most; each within limit unless a single line; whole
        lines only."""
        names = sorted(n for n in os.listdir(folder) if n == base or n.startswith(base + "."))
        allowed = {base} | {"%s.%d" % (base, i) for i in range(1, backups + 1)}
        self.assertEqual(set(names) - allowed, set(), names)
        for n in names:
            data = read(os.path.join(folder, n))
            if n != base:
                self.assertTrue(data.endswith("\n"), (n, data[-200:]))
            lines = data.splitlines(True)
            self.assertTrue(len(data.encode()) <= limit or len(lines) == 1,
                            "%s holds %d bytes in %d lines (limit %d)"
                            % (n, len(data.encode()), len(lines), limit))
        return names

    def test_rotation(self):
        logs_name = "rot"
        # The controller keeps 2 rotated files; the deployment's replicas 1 (its override).
        srv = self.start([app(dep_logging={"rotation_backup_count": 1})],
                         top={"logs_dir": logs_name, "rotation_max_bytes": 1500,
                              "rotation_backup_count": 2})
        logs = self.folder(srv, logs_name)
        k = 0

        def more(n=10):
            nonlocal k
            for _ in range(n):
                k += 1
                self.assertEqual(srv.get("/a/x?tag=r%d" % k).status, 200)
            srv_ok = os.path.exists(os.path.join(logs, "controller.log.2"))
            names = replica_files(logs)
            rep_ok = names and os.path.exists(os.path.join(logs, names[0] + ".1"))
            return srv_ok and rep_ok

        # Enough requests to rotate each file more times than it keeps backups.
        self.assertTrue(wait_until(more, 30), os.listdir(logs))
        for _ in range(4):
            more()
        last = k
        # The newest line is in the current file: wait for it (access lines leave in batches).
        self.assertTrue(wait_until(lambda: "for r%d" % last in read(os.path.join(
            logs, replica_files(logs)[0])), 10))
        ctl = self.check_rotated(logs, "controller.log", 1500, 2)
        self.assertEqual(ctl, ["controller.log", "controller.log.1", "controller.log.2"])
        rep = replica_files(logs)[0]
        self.assertEqual(self.check_rotated(logs, rep, 1500, 1), [rep, rep + ".1"])
        # The lines are kept in order: FILE.1 ends where FILE begins.
        older = read(os.path.join(logs, rep + ".1")).splitlines()
        newer = read(os.path.join(logs, rep)).splitlines()
        self.assertLessEqual(older[-1][:24], newer[0][:24])
        # The oldest lines are gone: the first request's replica line is in no file.
        self.assertNotIn("for r1\n", all_text(logs))

    def test_bad_logs_dir_is_a_config_error(self):
        srv = self.start([app()])
        regular = os.path.join(srv.dir, "plain")
        with open(regular, "w") as f:
            f.write("a file, not a folder\n")
        bad = os.path.join(regular, "logs")
        # `check` reports it at the value's position, as every config error.
        cfg_path = os.path.join(srv.dir, "bad.yaml")
        with open(cfg_path, "w") as f:
            f.write("logging_config:\n  logs_dir: %s\napplications:\n"
                    "  - import_path: loud.lua:app\n" % bad)
        rc, out = run_cli("check", cfg_path)
        self.assertEqual(rc, 1, out)
        self.assertIn("%s:2:13: logs_dir '%s' cannot hold log files: '%s' is not a folder"
                      % (cfg_path, bad, regular), out)
        # `run` refuses to start the same way.
        rc, out = run_cli("run", cfg_path)
        self.assertEqual(rc, 1, out)
        self.assertIn("cannot hold log files", out)
        # A deploy with it answers 400 and changes nothing (the server logs to stderr only).
        cfg = {"http_options": srv.http_options,
               "admin": {"host": srv.host, "port": srv.admin_port},
               "logging_config": {"logs_dir": bad}, "applications": [app()]}
        r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 400, r)
        self.assertIn("cannot hold log files", r.text)
        self.assertEqual(srv.get("/a/x").status, 200)
        self.assertFalse(os.path.exists(bad))
        # An unwritable folder (not as root: root writes anywhere).
        if os.geteuid() != 0:
            ro = os.path.join(srv.dir, "ro")
            os.mkdir(ro, 0o555)
            with open(cfg_path, "w") as f:
                f.write("logging_config:\n  logs_dir: %s/logs\napplications:\n"
                        "  - import_path: loud.lua:app\n" % ro)
            rc, out = run_cli("check", cfg_path)
            self.assertEqual(rc, 1, out)
            self.assertIn("'%s' is not writable" % ro, out)
        # Bad rotation settings are errors too.
        with open(cfg_path, "w") as f:
            f.write("logging_config: {rotation_max_bytes: -1, rotation_backup_count: x}\n"
                    "applications: []\n")
        rc, out = run_cli("check", cfg_path)
        self.assertEqual(rc, 1, out)
        self.assertIn("bad.yaml:1:38: rotation_max_bytes must be an integer >= 0", out)
        self.assertIn("bad.yaml:1:65: rotation_backup_count must be an integer from 0 to 1000",
                      out)

    def test_redeploy_moves_the_files(self):
        srv = self.start([app()], top={"logs_dir": "one"})
        one, two, three = (self.folder(srv, n) for n in ("one", "two", "three"))
        self.assertEqual(srv.get("/a/x?tag=before", headers={"X-Request-ID": "rid-1"}).status, 200)
        self.assertTrue(wait_until(lambda: "rid-1" in read(os.path.join(one, "controller.log")),
                                   10))
        old_replica = replica_files(one)
        self.assertEqual(len(old_replica), 1)
        # The controller to two/, the deployment's replicas to three/ (its own folder).
        cfg = {"http_options": srv.http_options,
               "admin": {"host": srv.host, "port": srv.admin_port},
               "logging_config": {"logs_dir": two},
               "applications": [app(dep_logging={"logs_dir": three})]}
        r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 200, r)
        # A changed logs_dir replaces the replicas: the new one writes to three/.
        self.assertTrue(wait_until(lambda: replica_files(three), 15), srv.stderr_tail())
        srv.wait_status("a", "Loud", lambda d: [x for x in d.get("replicas") or []
                                                if x.get("state") == "RUNNING"] and
                        all(x.get("state") == "RUNNING" for x in d.get("replicas") or []) and
                        len(d.get("replicas") or []) == 1, timeout=15, what="one new replica")
        self.assertEqual(srv.get("/a/x?tag=after", headers={"X-Request-ID": "rid-2"}).status, 200)
        self.assertTrue(wait_until(lambda: "rid-2" in read(os.path.join(two, "controller.log"))
                                   and "for after" in all_text(three), 10), srv.stderr_tail())
        self.assertNotIn("rid-2", all_text(one))
        self.assertNotIn("for after", all_text(one))
        self.assertNotIn("for after", all_text(two))
        self.assertNotIn(old_replica[0], replica_files(three))
        # Back to stderr only (null): the controller closes its file.
        cfg["logging_config"] = {"logs_dir": None}
        cfg["applications"] = [app()]
        r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(srv.get("/a/x", headers={"X-Request-ID": "rid-3"}).status, 200)
        self.assertTrue(wait_until(lambda: "rid-3" in srv.stderr_text(), 10))
        self.assertNotIn("rid-3", all_text(two))

    def test_stderr_off(self):
        srv = self.start([app()], top={"logs_dir": "quiet"},
                         env={"MOONSERVE_LOG_TO_STDERR": "0"})
        logs = self.folder(srv, "quiet")
        self.assertEqual(srv.get("/a/x?tag=q", headers={"X-Request-ID": "rid-q"}).status, 200)
        self.assertTrue(wait_until(lambda: "rid-q" in read(os.path.join(logs, "controller.log"))
                                   and "for q" in all_text(logs), 10))
        err = srv.stderr_text()
        self.assertNotIn("rid-q", err)
        self.assertNotIn("for q", err)


if __name__ == "__main__":
    harness.main()
