"""The CLI: `moonserve check` on every example and on broken configs (file:line:col: message,
did-you-mean), `run` on a broken config, version/help."""

import glob
import os
import re
import tempfile
import textwrap
import time
import unittest

import harness
from harness import run_cli

ERR_RE = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+)$", re.M)


def no_sanitizer(testcase, out):
    for m in harness.SANITIZER_MARKERS:
        testcase.assertNotIn(m, out)


class CheckTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="moonserve-check-")
        self.addCleanup(self.tmp.cleanup)
        with open(os.path.join(self.tmp.name, "hello.lua"), "w") as f:
            f.write(harness.HELLO_LUA)

    def write(self, name, text):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))
        return path

    def check(self, path):
        rc, out = run_cli("check", path, timeout=30)
        no_sanitizer(self, out)
        return rc, out

    def assert_error(self, path, line, col=None, pattern=None):
        rc, out = self.check(path)
        self.assertEqual(rc, 1, "check should fail with exit 1:\n" + out)
        errs = [m for m in ERR_RE.finditer(out)]
        self.assertTrue(errs, "no file:line:col: message in output:\n" + out)
        hit = [m for m in errs if int(m.group("line")) == line and
               (col is None or int(m.group("col")) == col)]
        self.assertTrue(hit, "no error at line %d col %r in:\n%s" % (line, col, out))
        m = hit[0]
        self.assertTrue(os.path.basename(m.group("file")) == os.path.basename(path),
                        "error names file %r" % m.group("file"))
        if pattern:
            self.assertRegex(m.group("msg"), pattern)
        return out

    # -- good configs -------------------------------------------------------------------------

    def test_examples_pass_check(self):
        configs = sorted(glob.glob(os.path.join(harness.SOURCE_DIR, "examples", "*",
                                                "config.yaml")))
        self.assertTrue(configs, "no examples/*/config.yaml found")
        self.assertTrue(any("/hello/" in c for c in configs), configs)
        for cfg in configs:
            with self.subTest(config=cfg):
                rc, out = self.check(cfg)
                self.assertEqual(rc, 0, "%s failed check:\n%s" % (cfg, out))

    def test_check_from_other_cwd_resolves_against_config_folder(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replicas: 2
                    max_ongoing_requests: 3
                    max_queued_requests: 10
                    user_config: {suffix: "!"}
                    graceful_shutdown_wait_loop_s: 0.5
                    graceful_shutdown_timeout_s: 3
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 0, out)

    # -- bad configs ----------------------------------------------------------------------------

    def test_unknown_deployment_key_did_you_mean(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replica: 2
            """)
        out = self.assert_error(path, 7, 9, r"num_replica")
        self.assertRegex(out.lower(), r"did you mean.*num_replicas")

    def test_unknown_top_level_key_did_you_mean(self):
        path = self.write("config.yaml", """
            http_options:
              port: 8000
            aplications:
              - name: hello
                import_path: hello.lua:app
            """)
        out = self.assert_error(path, 3, 1, r"aplications")
        self.assertRegex(out.lower(), r"did you mean.*applications")

    def test_unknown_http_option(self):
        path = self.write("config.yaml", """
            http_options:
              request_timeout: 5
            applications:
              - name: hello
                import_path: hello.lua:app
            """)
        out = self.assert_error(path, 2, 3, r"request_timeout")
        self.assertRegex(out.lower(), r"did you mean.*request_timeout_s")

    def test_invalid_values(self):
        cases = [
            ("num_replicas: 0", r"num_replicas"),
            ("max_ongoing_requests: 0", r"max_ongoing_requests"),
            ("num_replicas: many", r"num_replicas"),
            ("graceful_shutdown_timeout_s: -1", r"graceful_shutdown_timeout_s"),
        ]
        for line, pat in cases:
            with self.subTest(line=line):
                path = self.write("config.yaml", """
                    applications:
                      - name: hello
                        route_prefix: /hello
                        import_path: hello.lua:app
                        deployments:
                          - name: Hello
                            %s
                    """ % line)
                self.assert_error(path, 7, None, pat)

    def test_bad_route_prefix(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                route_prefix: hello/
                import_path: hello.lua:app
            """)
        self.assert_error(path, 3, None, r"route_prefix")

    def test_duplicate_app_names(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                route_prefix: /a
                import_path: hello.lua:app
              - name: hello
                route_prefix: /b
                import_path: hello.lua:app
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 1, out)
        self.assertTrue(ERR_RE.search(out), out)

    def test_yaml_syntax_error(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                import_path: [unclosed
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 1, out)
        self.assertTrue(ERR_RE.search(out), out)

    def test_missing_lua_file(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                import_path: nothere.lua:app
            """)
        self.assert_error(path, 3, None, r"nothere")

    def test_lua_syntax_error_reported(self):
        self.write("broken.lua", """
            local serve = require "moonserve"
            local X = serve.deployment { name = "X" }
            function X:__call(req)
              return {  -- unclosed
            end
            return { app = X:bind() }
            """)
        path = self.write("config.yaml", """
            applications:
              - name: broken
                import_path: broken.lua:app
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 1, out)
        self.assertIn("broken.lua", out)

    def test_unknown_deployment_name(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                import_path: hello.lua:app
                deployments:
                  - name: Helo
            """)
        out = self.assert_error(path, 5, None, r"Helo")
        self.assertIn("Hello", out)

    def code_named(self, name):
        """A config whose one application's code declares a deployment called `name`."""
        self.write("named.lua", """
            local serve = require "moonserve"
            local D = serve.deployment { name = "%s" }
            function D:__call(req) return "x" end
            return { app = D:bind() }
            """ % name)
        return self.write("config.yaml", """
            applications:
              - name: bad
                route_prefix: /bad
                import_path: named.lua:app
            """)

    def test_code_deployment_name_follows_the_name_rule(self):
        self.assert_error(self.code_named(".."), 4, 18,
                          r"^application 'bad': deployment name '\.\.' \(from its code\) is "
                          r"'\.' or '\.\.' \(a name must not contain '/', be '\.' or '\.\.', or "
                          r"exceed 255 bytes\)$")
        self.assert_error(self.code_named("n" * 300), 4, 18,
                          r"\(from its code\) is longer than 255 bytes")
        rc, out = self.check(self.code_named("fine name"))
        self.assertEqual(rc, 0, out)

    def actor_config(self, options):
        return self.write("config.yaml", """
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    ray_actor_options: %s
            """ % options)

    def test_actor_options_warns_only_of_keys_without_effect(self):
        rc, out = self.check(
            self.actor_config("{memory: 100000000, num_cpus: 2, resources: {x: 1}}"))
        self.assertEqual(rc, 0, out)
        self.assertRegex(out, r"config.yaml:7:9: warning: ray_actor_options: 'num_cpus', "
                              r"'resources' have no effect yet \(only 'memory' and 'num_gpus' do: "
                              r"the replica's Lua memory cap and its GPU share\)")
        self.assertNotIn("not supported yet", out)
        rc, out = self.check(self.actor_config("{num_gpus: 0.5, memory: 100000000}"))
        self.assertEqual(rc, 0, out)
        self.assertNotIn("warning", out)

    def test_actor_options_memory_alone_warns_of_nothing(self):
        rc, out = self.check(self.actor_config("{memory: 100000000}"))
        self.assertEqual(rc, 0, out)
        self.assertNotIn("warning", out)

    def test_actor_options_bad_memory(self):
        self.assert_error(self.actor_config("{memory: lots}"), 7, 37,
                          r"memory must be a number of bytes >= 0 or null, got \"lots\"")

    # -- Ray Serve compatibility ---------------------------------------------------------------

    def test_ray_config_spelling_out_builtins_and_newer_keys_passes(self):
        path = self.write("config.yaml", """
            logging_config:
              log_level: WARN
            tracing_config: {exporter_import_path: tracing:setup}
            applications:
              - name: hello
                route_prefix: /hello
                import_path: hello.lua:app
                autoscaling_policy:
                  policy_function: ray.serve.autoscaling_policy:default_autoscaling_policy
                deployments:
                  - name: Hello
                    autoscaling_config:
                      max_replicas: 2
                      policy:
                        policy_function: ray.serve.autoscaling_policy.default_autoscaling_policy
                    request_router_config:
                      request_router_class: ray.serve._private.request_router.PowerOfTwoChoicesRequestRouter
                      ingress_router_fallback: true
                    gang_scheduling_config: {gang_size: 1}
                    deployment_actors: [{name: counter}]
                    backpressure_config: {status_code: 429}
                    rolling_update_percentage: 25
            """)
        rc, out = self.check(path)
        self.assertEqual(rc, 0, out)
        for key, line, col in [("tracing_config", 3, 1), ("ingress_router_fallback", 18, 11),
                               ("gang_scheduling_config", 19, 9), ("deployment_actors", 20, 9),
                               ("backpressure_config", 21, 9),
                               ("rolling_update_percentage", 22, 9)]:
            with self.subTest(key=key):
                self.assertRegex(out, r"config\.yaml:%d:%d: warning: '%s' is not supported yet"
                                 % (line, col, key))

    def test_ray_old_key_names_did_you_mean(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    max_concurrent_queries: 3
            """)
        out = self.assert_error(path, 6, 9, r"max_concurrent_queries")
        self.assertRegex(out, r"did you mean 'max_ongoing_requests'")

    def test_ray_number_and_log_level_rules(self):
        cases = [
            ("num_replicas: \"3\"", 6, r"num_replicas .*got the string \"3\".*without quotes"),
            ("max_queued_requests: '5'", 6, r"max_queued_requests .*without quotes"),
        ]
        for line, at, pat in cases:
            with self.subTest(line=line):
                path = self.write("config.yaml", """
                    applications:
                      - name: hello
                        import_path: hello.lua:app
                        deployments:
                          - name: Hello
                            %s
                    """ % line)
                self.assert_error(path, at, None, pat)
        path = self.write("config.yaml", """
            logging_config: {log_level: debug}
            applications:
              - name: hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    max_ongoing_requests: "4"
            """)
        out = self.assert_error(path, 1, 29, r"log_level")
        self.assertIn("did you mean 'DEBUG'", out)
        self.assertEqual(len(ERR_RE.findall(out)), 1, "a quoted max_ongoing_requests is fine:\n"
                         + out)

    def test_run_on_bad_config_fails_fast(self):
        path = self.write("config.yaml", """
            applications:
              - name: hello
                import_path: hello.lua:app
                deployments:
                  - name: Hello
                    num_replica: 2
            """)
        t0 = time.monotonic()
        rc, out = run_cli("run", path, timeout=20)
        self.assertEqual(rc, 1, out)
        self.assertLess(time.monotonic() - t0, 10)
        self.assertTrue(ERR_RE.search(out), out)
        no_sanitizer(self, out)

    # -- misc CLI -------------------------------------------------------------------------------

    def test_version(self):
        rc, out = run_cli("version")
        self.assertEqual(rc, 0, out)
        self.assertTrue(out.strip(), "version printed nothing")
        self.assertRegex(out, r"\d+\.\d+")

    def test_help(self):
        rc, out = run_cli("help")
        self.assertEqual(rc, 0, out)
        for word in ("run", "check"):
            self.assertIn(word, out)

    def test_unknown_command_fails(self):
        rc, out = run_cli("frobnicate")
        self.assertNotEqual(rc, 0, out)

    def test_check_missing_file(self):
        rc, out = run_cli("check", os.path.join(self.tmp.name, "nope.yaml"))
        self.assertNotEqual(rc, 0, out)
        self.assertIn("nope.yaml", out)


if __name__ == "__main__":
    harness.main()
