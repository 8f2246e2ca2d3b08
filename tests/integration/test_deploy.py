"""Declarative deploys (PUT /api/serve/applications/ and `moonserve deploy`): a whole config is
the goal state. Lightweight changes apply in place (user_config reaches reconfigure() without a
restart, num_replicas changes the count); code changes replace replicas, new ones ready before
old ones stop; applications missing from the config are removed and new ones started; an invalid
config answers 400 with every error and changes nothing; an externally set count survives a
redeploy. Under steady load, neither an in-place update nor a rolling update fails a request."""

import json
import os

import harness
from harness import LoadGen, hello_app, run_cli

FAST_STOP = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 3}


def running(dep):
    return [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]


class DeployTest(harness.ServerTestCase):
    APPLICATIONS = [
        hello_app("hello", "/hello", dict(num_replicas=2, user_config={"suffix": "v1"},
                                          **FAST_STOP)),
        dict(hello_app("ext", "/ext", dict(num_replicas=1, **FAST_STOP)),
             external_scaler_enabled=True),
    ]

    def config(self, apps):
        """The server's config with other applications (same http_options and admin)."""
        return {"http_options": self.server.http_options,
                "admin": {"host": self.server.host, "port": self.server.admin_port},
                "applications": apps}

    def deploy(self, cfg):
        return self.server.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)

    def pids(self, app):
        return {r["pid"] for r in running(self.server.deployment_status(app, "Hello"))}

    def wait_count(self, app, n):
        return self.server.wait_status(app, "Hello", lambda d: len(running(d)) == n and
                                       d.get("target_num_replicas") == n, timeout=15,
                                       what="%d running replicas" % n)

    def base_apps(self, suffix="v1", replicas=2, ext_replicas=1):
        return [hello_app("hello", "/hello", dict(num_replicas=replicas,
                                                  user_config={"suffix": suffix}, **FAST_STOP)),
                dict(hello_app("ext", "/ext", dict(num_replicas=ext_replicas, **FAST_STOP)),
                     external_scaler_enabled=True)]

    def test_1_user_config_in_place_under_load(self):
        self.wait_count("hello", 2)
        before = self.pids("hello")
        with LoadGen(self.server, "/hello/x?w={i}", 4) as load:
            r = self.deploy(self.config(self.base_apps(suffix="v2")))
            self.assertEqual(r.status, 200, r)
            # reconfigure() runs asynchronously in each replica: both answer v2 soon
            harness.wait_until(lambda: {self.server.get("/hello/x?k=%d" % k).json().get("suffix")
                                        for k in range(6)} == {"v2"}, timeout=5)
        self.assertEqual(load.failures, [], "requests failed during a user_config update")
        self.assertGreater(load.count, 0)
        self.assertEqual(self.server.get("/hello/x").json().get("suffix"), "v2")
        self.assertEqual(self.pids("hello"), before, "user_config must not restart replicas")

    def test_2_rolling_update_under_load(self):
        self.wait_count("hello", 2)
        before = self.pids("hello")
        # the same code in another file: a code change, replicas must be replaced
        with open(os.path.join(self.server.dir, "hello.lua")) as f:
            text = f.read()
        self.server.write_file("hello2.lua", text)
        apps = self.base_apps(suffix="v2")
        apps[0]["import_path"] = "hello2.lua:app"
        with LoadGen(self.server, "/hello/x?sleep=0.02&w={i}", 4) as load:
            r = self.deploy(self.config(apps))
            self.assertEqual(r.status, 200, r)
            self.server.wait_status("hello", "Hello", lambda d: len(running(d)) == 2 and
                                    not ({x["pid"] for x in running(d)} & before), timeout=15,
                                    what="two replicas of the new version")
        self.assertEqual(load.failures, [], "requests failed during a rolling update")
        self.assertGreater(load.count, 0)

    def test_3_count_apps_and_external_count(self):
        srv = self.server
        self.assertEqual(srv.scale("ext", "Hello", 3).status, 200)
        self.wait_count("ext", 3)
        apps = self.base_apps(suffix="v2", replicas=1, ext_replicas=1)
        apps[0]["import_path"] = "hello2.lua:app" if os.path.exists(
            os.path.join(srv.dir, "hello2.lua")) else "hello.lua:app"
        apps.append(hello_app("extra", "/extra", dict(num_replicas=1, **FAST_STOP)))
        r = self.deploy(self.config(apps))
        self.assertEqual(r.status, 200, r)
        self.wait_count("hello", 1)
        self.wait_count("extra", 1)
        self.assertEqual(srv.get("/extra/x").status, 200)
        # the externally set count survives the redeploy
        self.assertEqual(srv.deployment_status("ext", "Hello")["target_num_replicas"], 3)
        # the application left out of the next config is removed, its route too
        r = self.deploy(self.config(apps[:2]))
        self.assertEqual(r.status, 200, r)
        srv.wait_status("hello", "Hello", lambda d: "extra" not in srv.status()["applications"],
                        timeout=10, what="application 'extra' removed")
        self.assertEqual(srv.get("/extra/x").status, 404)
        self.assertNotIn("/extra", srv.get("/-/routes").json())

    def test_4_invalid_config_changes_nothing(self):
        srv = self.server
        before = json.dumps(srv.status()["applications"]["hello"]["deployments"]["Hello"]
                            ["target_num_replicas"])
        apps = self.base_apps()
        apps[0]["deployments"][0]["num_replica"] = 3          # unknown key
        apps[1]["route_prefix"] = "no-slash"                   # bad prefix
        r = self.deploy(self.config(apps))
        body = self.assertErrorJSON(r, 400)
        self.assertGreaterEqual(len(body.get("errors") or []), 2, body)
        self.assertTrue(any("num_replica" in e and "did you mean" in e for e in body["errors"]),
                        body)
        after = json.dumps(srv.status()["applications"]["hello"]["deployments"]["Hello"]
                           ["target_num_replicas"])
        self.assertEqual(before, after)
        # YAML through the CLI, same answer
        path = os.path.join(srv.dir, "bad.yaml")
        with open(path, "w") as f:
            f.write(harness.to_yaml(self.config(apps)))
        rc, out = run_cli("deploy", path, "--address",
                          "http://%s:%d" % (srv.host, srv.admin_port))
        self.assertEqual(rc, 1, out)
        self.assertIn("did you mean", out)

    def test_5_actor_options_change_rolls(self):
        self.wait_count("ext", self.server.deployment_status("ext", "Hello")
                        ["target_num_replicas"])
        before = self.pids("ext")
        apps = self.base_apps()
        apps[0]["import_path"] = "hello2.lua:app" if os.path.exists(
            os.path.join(self.server.dir, "hello2.lua")) else "hello.lua:app"
        apps[1]["deployments"][0]["ray_actor_options"] = {"num_cpus": 2}
        r = self.deploy(self.config(apps))
        self.assertEqual(r.status, 200, r)
        self.server.wait_status("ext", "Hello", lambda d: running(d) and not (
            {x["pid"] for x in running(d)} & before), timeout=15,
            what="replicas replaced after a ray_actor_options change")


    def test_6_code_deployment_name_is_refused(self):
        # a deployment named only in code follows the config's name rule: 400, nothing changes
        self.server.write_file("dotdot.lua", """
local serve = require "moonserve"
local D = serve.deployment { name = ".." }
function D:__call(req) return "x" end
return { app = D:bind() }
""")
        apps = self.base_apps() + [{"name": "bad", "route_prefix": "/bad",
                                    "import_path": "dotdot.lua:app"}]
        body = self.assertErrorJSON(self.deploy(self.config(apps)), 400)
        self.assertTrue(any("deployment name '..' (from its code) is '.' or '..'" in e
                            for e in body.get("errors") or []), body)
        self.assertNotIn("bad", self.server.status()["applications"])


if __name__ == "__main__":
    harness.main()
