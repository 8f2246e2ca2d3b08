"""Install and package (docs/install.md). `cmake --install` of the build under test into a
temporary prefix puts the binary, the Lua runtime, the router and policy library, the dashboards
(Grafana's and the web one, which the moved tree serves from its own share folder),
the docs, the default config with its hello app and the systemd unit in their places. The tree is
then moved to another folder and run from there, from an unrelated working directory, with
MOONSERVE_LUA_DIR unset: `check` passes on the shipped config, `run` serves the hello app, the
built-in router is the moved tree's share/moonserve/lua/router.lua, SIGHUP (the unit's
ExecReload) reloads it, SIGTERM stops everything with exit 0. A copy without its share/moonserve/lua
fails and names that folder, so nothing falls back to the source tree (whose path is not in the
binary either). The .deb that cpack builds has the name, Depends, conffiles, unit and files the
docs promise, and its extracted tree passes `check` too. Nothing is installed on this machine."""

import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import unittest

import harness
from harness import Server, free_port, wait_until

BUILD_DIR = os.path.dirname(os.path.abspath(harness.BIN))
SOURCE_LUA = os.path.join(harness.SOURCE_DIR, "lua")


def cmake_cache(name):
    try:
        with open(os.path.join(BUILD_DIR, "CMakeCache.txt")) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def clean_env():
    """The environment of an installed binary: no override of the Lua or dashboard folder."""
    env = dict(os.environ)
    env.pop("MOONSERVE_LUA_DIR", None)
    env.pop("MOONSERVE_DASHBOARD_DIR", None)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    return env


def run(cmd, cwd, env=None, timeout=60):
    return subprocess.run(cmd, cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def tree_files(root):
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def unit_settings(text):
    """[Service]-style KEY=VALUE lines of a unit (comments skipped); a repeated key keeps all."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k, []).append(v)
    return out


class InstalledServer(Server):
    """The harness's server, started from an installed tree on its shipped config: only the two
    ports are changed (tests run in parallel), the config stays in the tree's etc/moonserve."""

    def __init__(self, prefix, cwd):
        self.prefix = prefix
        self.bin_path = os.path.join(prefix, "bin", "moonserve")
        self.installed_config = os.path.join(prefix, "etc", "moonserve", "config.yaml")
        with open(self.installed_config) as f:
            self.template = f.read()
        self.run_cwd = cwd
        Server.__init__(self, applications=[])

    def _write_config(self):
        self.port = free_port(self.host)
        self.admin_port = free_port(self.host)
        self.admin_token = None
        self.http_options = {"host": self.host, "port": self.port}
        text, n_http = re.subn(r"(?m)^  port: 8000$", "  port: %d" % self.port, self.template)
        text, n_admin = re.subn(r"(?m)^  port: 8265$", "  port: %d" % self.admin_port, text)
        if (n_http, n_admin) != (1, 1):
            raise AssertionError("the shipped config no longer has one `port: 8000` (http) and one "
                                 "`port: 8265` (admin):\n" + self.template)
        with open(self.installed_config, "w") as f:
            f.write(text)
        self.config_path = self.installed_config

    def _spawn(self):
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen([self.bin_path, "run", self.config_path], cwd=self.run_cwd,
                                     stdin=subprocess.DEVNULL, stdout=self._stdout,
                                     stderr=self._stderr, env=clean_env())
        self.pid = self.proc.pid


class InstallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="moonserve-install-")
        root = cls.tmp.name
        cls.first_prefix = os.path.join(root, "stage")
        r = run(["cmake", "--install", BUILD_DIR, "--prefix", cls.first_prefix], cwd=root,
                timeout=120)
        if r.returncode != 0:
            raise AssertionError("cmake --install failed:\n" + r.stdout + r.stderr)
        # Relocation: the tree moves after install, so every path it uses must be relative.
        cls.prefix = os.path.join(root, "moved", "elsewhere")
        os.makedirs(os.path.dirname(cls.prefix))
        os.rename(cls.first_prefix, cls.prefix)
        cls.cwd = os.path.join(root, "cwd")  # an empty working directory
        os.makedirs(cls.cwd)
        cls.bin = os.path.join(cls.prefix, "bin", "moonserve")
        cls.config = os.path.join(cls.prefix, "etc", "moonserve", "config.yaml")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, *parts):
        return os.path.join(self.prefix, *parts)

    # -- layout -----------------------------------------------------------------------------

    def test_layout(self):
        self.assertTrue(os.access(self.bin, os.X_OK), self.bin)
        share = self.path("share", "moonserve")
        # the Lua runtime is the source's lua/, file for file
        self.assertEqual(tree_files(os.path.join(share, "lua")), tree_files(SOURCE_LUA))
        for rel in sorted(tree_files(SOURCE_LUA)):
            with open(os.path.join(share, "lua", rel), "rb") as a, \
                    open(os.path.join(SOURCE_LUA, rel), "rb") as b:
                self.assertEqual(a.read(), b.read(), rel)
        for kind in ("routers", "policies"):
            src = os.path.join(harness.SOURCE_DIR, "scripts", kind)
            self.assertEqual(tree_files(os.path.join(share, "scripts", kind)), tree_files(src),
                             kind)
        self.assertTrue(os.path.isfile(os.path.join(share, "dashboards", "grafana",
                                                    "moonserve.json")))
        self.assertTrue(os.path.isfile(os.path.join(share, "examples", "hello", "app.lua")))
        # the web dashboard's files, file for file
        web = os.path.join(harness.SOURCE_DIR, "web")
        self.assertTrue(os.path.isfile(os.path.join(web, "dashboard", "index.html")))
        self.assertEqual(tree_files(os.path.join(share, "web")), tree_files(web))
        doc = self.path("share", "doc", "moonserve")
        self.assertTrue(os.path.isfile(os.path.join(doc, "README.md")))
        self.assertEqual(tree_files(os.path.join(doc, "docs")),
                         tree_files(os.path.join(harness.SOURCE_DIR, "docs")))
        self.assertTrue(os.path.isfile(os.path.join(doc, "docs", "install.md")))
        self.assertTrue(os.path.isfile(self.path("etc", "moonserve", "hello.lua")))
        # nothing of the build or the tests comes along
        self.assertFalse(os.path.exists(self.path("share", "moonserve", "scripts", "tools")))
        self.assertEqual(sorted(os.listdir(self.path("bin"))), ["moonserve"])

    def test_unit_names_the_install_prefix(self):
        with open(self.path("lib", "systemd", "system", "moonserve.service")) as f:
            text = f.read()
        s = unit_settings(text)
        # written for the prefix installed to (the tree moved afterwards)
        first = self.first_prefix
        self.assertEqual(s["ExecStart"], ["%s/bin/moonserve run %s/etc/moonserve/config.yaml"
                                          % (first, first)])
        self.assertEqual(s["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(s["KillSignal"], ["SIGTERM"])
        analyze = shutil.which("systemd-analyze")
        if analyze:
            # verify reads the unit offline; it needs the binary at the path the unit names
            unit_dir = tempfile.mkdtemp(dir=self.tmp.name)
            os.symlink(self.prefix, first)
            try:
                with open(os.path.join(unit_dir, "moonserve.service"), "w") as f:
                    f.write(text)
                r = run([analyze, "verify", "--man=no",
                         os.path.join(unit_dir, "moonserve.service")], cwd=self.cwd)
            finally:
                os.unlink(first)
            problems = [l for l in (r.stdout + r.stderr).splitlines() if "moonserve.service" in l]
            self.assertEqual(problems, [], r.stdout + r.stderr)

    def test_no_source_path_compiled_in(self):
        with open(self.bin, "rb") as f:
            data = f.read()
        self.assertNotIn(os.fsencode(SOURCE_LUA), data,
                         "the installed binary names the source tree's lua folder")

    # -- running the moved tree -------------------------------------------------------------

    def test_check_shipped_config(self):
        r = run([self.bin, "check", self.config], cwd=self.cwd)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("%s: ok" % self.config, r.stdout)
        r = run([self.bin, "version"], cwd=self.cwd)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"^moonserve \d+\.\d+\.\d+")

    def test_run_serve_reload_stop(self):
        srv = InstalledServer(self.prefix, self.cwd)
        self.addCleanup(srv.cleanup)
        srv.start()
        r = srv.get("/?name=moon")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["message"], "Hello, moon!")
        # the built-in router came from the moved tree
        lua_dir = os.path.realpath(self.path("share", "moonserve", "lua"))
        router = srv.deployment_status("hello", "Hello").get("router") or {}
        self.assertEqual(router.get("path"), os.path.join(lua_dir, "router.lua"), router)
        # the unit's ExecReload: SIGHUP reloads the scripts and the server goes on serving
        srv.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "reload applied" in srv.stderr_text(), 10),
                        srv.stderr_tail())
        self.assertIn("reload: %s/router.lua v2" % lua_dir, srv.stderr_text())
        self.assertEqual(srv.get("/?name=again").status, 200)
        self.assertNotIn(harness.SOURCE_DIR + "/lua", srv.stderr_text())
        # the dashboard comes from the moved tree's share/moonserve/web/dashboard: a marker
        # added there (and not in the source tree) is served
        marker = self.path("share", "moonserve", "web", "dashboard", "install-marker.txt")
        with open(marker, "w") as f:
            f.write("moved tree")
        self.addCleanup(os.unlink, marker)
        r = srv.admin_request("GET", "/dashboard/install-marker.txt")
        self.assertEqual((r.status, r.body), (200, b"moved tree"), r)
        r = srv.admin_request("GET", "/dashboard/")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("content-type"), "text/html; charset=utf-8")
        srv.stop()  # SIGTERM: exit 0, no replica left, no sanitizer report

    def test_without_share_lua_nothing_falls_back(self):
        copy = os.path.join(self.tmp.name, "no-lua")
        shutil.copytree(self.prefix, copy, symlinks=True)
        self.addCleanup(shutil.rmtree, copy, True)
        shutil.rmtree(os.path.join(copy, "share", "moonserve", "lua"))
        config = os.path.join(copy, "etc", "moonserve", "config.yaml")
        r = run([os.path.join(copy, "bin", "moonserve"), "check", config], cwd=self.cwd)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("module 'moonserve' not found", r.stderr)
        self.assertIn(os.path.join(copy, "share", "moonserve", "lua", "moonserve.lua"), r.stderr)
        self.assertNotIn(harness.SOURCE_DIR, r.stderr)
        # MOONSERVE_LUA_DIR still overrides it
        env = clean_env()
        env["MOONSERVE_LUA_DIR"] = SOURCE_LUA
        r = run([os.path.join(copy, "bin", "moonserve"), "check", config], cwd=self.cwd, env=env)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    # -- the .deb ---------------------------------------------------------------------------

    def test_deb(self):
        if cmake_cache("MS_SANITIZE") in ("ON", "TRUE", "1"):
            self.skipTest("sanitizer build: a .deb of an ASan binary (Depends on libasan) is "
                          "never shipped; the release build's run checks the package")
        for tool in ("cpack", "dpkg-deb"):
            if not shutil.which(tool):
                self.skipTest("%s not installed" % tool)
        out = tempfile.mkdtemp(dir=self.tmp.name)
        t0 = time.monotonic()
        r = run(["cpack", "--config", os.path.join(BUILD_DIR, "CPackConfig.cmake"), "-B", out],
                cwd=out, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertLess(time.monotonic() - t0, 60)
        debs = [f for f in os.listdir(out) if f.endswith(".deb")]
        self.assertEqual(len(debs), 1, os.listdir(out))
        deb = os.path.join(out, debs[0])
        self.assertRegex(debs[0], r"^moonserve_\d+\.\d+\.\d+_[a-z0-9]+\.deb$")

        def field(name):
            r = run(["dpkg-deb", "-f", deb, name], cwd=out)
            self.assertEqual(r.returncode, 0, r.stderr)
            return r.stdout.strip()

        self.assertEqual(field("Package"), "moonserve")
        depends = [d.strip() for d in field("Depends").split(",")]
        names = [re.sub(r"\s*\(.*?\)", "", d) for d in depends]
        for lib in ("libuv1", "libjansson4", "libyaml-0-2", "libc6"):
            self.assertIn(lib, names, depends)
        self.assertTrue(any("libluajit" in n for n in names), depends)
        self.assertIn("libopenblas0", field("Recommends"))

        info = run(["dpkg-deb", "-I", deb, "conffiles"], cwd=out)
        self.assertEqual(info.returncode, 0, info.stderr)
        self.assertEqual(sorted(info.stdout.split()),
                         ["/etc/moonserve/config.yaml", "/etc/moonserve/hello.lua"])

        listing = run(["dpkg-deb", "-c", deb], cwd=out)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        paths = {l.split()[-1] for l in listing.stdout.splitlines() if l.strip()}
        for p in ("./usr/bin/moonserve", "./usr/share/moonserve/lua/moonserve.lua",
                  "./usr/share/moonserve/lua/router.lua", "./usr/share/moonserve/lua/autoscaling.lua",
                  "./usr/share/moonserve/scripts/routers/consistent_hash.lua",
                  "./usr/share/moonserve/dashboards/grafana/moonserve.json",
                  "./usr/share/moonserve/web/dashboard/index.html",
                  "./usr/share/moonserve/web/dashboard/dashboard.js",
                  "./usr/share/moonserve/web/dashboard/dashboard.css",
                  "./usr/lib/systemd/system/moonserve.service", "./etc/moonserve/config.yaml",
                  "./etc/moonserve/hello.lua", "./usr/share/doc/moonserve/docs/install.md"):
            self.assertIn(p, paths)
        self.assertFalse([p for p in paths if "/usr/etc" in p or "/usr/local" in p], paths)

        # the unit as packaged
        fsys = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE,
                              check=True, timeout=60).stdout
        tar_path = os.path.join(out, "data.tar")
        with open(tar_path, "wb") as f:
            f.write(fsys)
        with tarfile.open(tar_path) as tf:
            unit = tf.extractfile("./usr/lib/systemd/system/moonserve.service").read().decode()
            self.assertEqual(tf.getmember("./usr/bin/moonserve").uid, 0)
        s = unit_settings(unit)
        self.assertEqual(s["ExecStart"], ["/usr/bin/moonserve run /etc/moonserve/config.yaml"])
        self.assertEqual(s["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(s["KillSignal"], ["SIGTERM"])
        self.assertEqual(s["KillMode"], ["mixed"])
        # room for the requests' drain and then the replicas' (20 s each by default)
        self.assertGreaterEqual(int(s["TimeoutStopSec"][0]), 45)

        # the package's own tree works where it is unpacked (the binary is stripped)
        root = os.path.join(out, "root")
        r = run(["dpkg-deb", "-x", deb, root], cwd=out)
        self.assertEqual(r.returncode, 0, r.stderr)
        cfg = os.path.join(root, "etc", "moonserve", "config.yaml")
        r = run([os.path.join(root, "usr", "bin", "moonserve"), "check", cfg], cwd=self.cwd)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    harness.main()
