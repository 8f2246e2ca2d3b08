"""Every examples/*/config.yaml runs: a copy of examples/ in a temp folder (so `../policies/...`
paths resolve), the config's HTTP port replaced by a free one and an admin listener on another
free port; the server becomes healthy, every application reaches RUNNING with its replicas
running, no autoscaling policy fails for a second of control-loop ticks, each route reaches
the application's code (no 404/502/503/504 to a GET), and the server exits cleanly on SIGTERM."""

import glob
import os
import re
import shutil
import time
import unittest

import harness
from harness import free_port

EXAMPLES = os.path.join(harness.SOURCE_DIR, "examples")


class ExampleServer(harness.Server):
    def __init__(self, name):
        self.example = name
        super().__init__([], shutdown_timeout_s=20.0)

    def _write_config(self):
        root = os.path.join(self.dir, "examples")
        if not os.path.isdir(root):
            shutil.copytree(EXAMPLES, root)
        self.config_path = os.path.join(root, self.example, "config.yaml")
        with open(os.path.join(EXAMPLES, self.example, "config.yaml")) as f:
            text = f.read()
        self.port = free_port(self.host)
        self.admin_port = free_port(self.host)
        self.admin_token = None
        if re.search(r"^http_options:", text, re.M):
            text, n = re.subn(r"^(\s+port:\s*)\d+", r"\g<1>%d" % self.port, text, count=1,
                              flags=re.M)
            assert n == 1, "no http_options.port in %s" % self.example
            text = re.sub(r"^(\s+host:\s*)\S+", r"\g<1>127.0.0.1", text, count=1, flags=re.M)
        else:
            text += "\nhttp_options:\n  host: 127.0.0.1\n  port: %d\n" % self.port
        assert not re.search(r"^admin:", text, re.M), "example sets admin: adapt the test"
        text += "\nadmin:\n  host: 127.0.0.1\n  port: %d\n" % self.admin_port
        with open(self.config_path, "w") as f:
            f.write(text)


def examples():
    return sorted(os.path.basename(os.path.dirname(p))
                  for p in glob.glob(os.path.join(EXAMPLES, "*", "config.yaml")))


class ExamplesRunTest(unittest.TestCase):

    def test_examples_found(self):
        self.assertTrue(examples())

    def run_example(self, name):
        srv = ExampleServer(name)
        self.addCleanup(srv.cleanup)
        srv.start()
        doc = harness.wait_until(lambda: all(
            a.get("status") == "RUNNING" and all(
                len([r for r in d.get("replicas") or [] if r.get("state") == "RUNNING"])
                >= max(1, min(d.get("target_num_replicas") or 0, 8))
                for d in a.get("deployments", {}).values())
            for a in srv.status()["applications"].values()) and srv.status(), 15, 0.1)
        self.assertTrue(doc, "%s: applications not all RUNNING: %r" % (name, srv.status()))
        time.sleep(1.0)
        doc = srv.status()
        for app_name, app in doc["applications"].items():
            for dep_name, dep in app.get("deployments", {}).items():
                a = (dep.get("autoscaling") or {}).get("policy") or {}
                self.assertEqual(a.get("failures", 0), 0, "%s %s/%s: %r"
                                 % (name, app_name, dep_name, a))
        routes = srv.get("/-/routes").json()
        self.assertTrue(routes, routes)
        for prefix in routes:
            # reached the app's code (whose answer to a bare GET may be its own error)
            r = srv.get(prefix)
            self.assertNotIn(r.status, (404, 502, 503, 504), "%s GET %s: %r" % (name, prefix, r))
        srv.stop()

    def test_each_example_runs(self):
        for name in examples():
            with self.subTest(example=name):
                self.run_example(name)


if __name__ == "__main__":
    harness.main()
