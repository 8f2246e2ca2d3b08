"""The web dashboard on the admin listener (docs/dashboard.md).

Static route: GET /dashboard redirects to /dashboard/, which serves web/dashboard/index.html; the
files come with their content types, Cache-Control and a CSP, byte for byte the source tree's,
without the token (the data endpoints still need it); missing files and unknown types are 404
JSON, traversal, dotfiles, escapes and absolute-looking names are refused, other methods are 405,
and the Host rule still applies. MOONSERVE_DASHBOARD_DIR replaces the folder.

The page, in headless Chromium driven over DevTools: loaded without a token it says it needs one;
with #token=... (taken out of the address bar at once) it polls the admin API and shows, for an
autoscaling deployment under load, the deployments, their states, running and target replica
counts equal to the status document's at the same moment, a request rate and an error rate above
zero, p50/p99, the scripts' versions after a reload, the last reload's result and the history (or
"history not available" while GET /api/v1/history answers 404; with a history answered inside
the page, its decisions, last reload and lifecycle events instead). Its Prometheus parser and
quantile are checked against values computed here. A screenshot goes to the test's folder (and
to $MOONSERVE_DASHBOARD_SCREENSHOT when set, which is how docs/dashboard.png is made)."""

import http.client
import json
import os
import shutil
import tempfile
import time
import unittest

import harness
from chromium import Chromium
from harness import LoadGen, ServerTestCase, hello_app, start_server

TOKEN = "dash-token-4f1e9c"
WEB = os.path.join(harness.SOURCE_DIR, "web", "dashboard")


def admin_get(srv, path, headers=None, method="GET"):
    """A request to the admin listener sent as written (http.client keeps `..` and `%2e`)."""
    conn = http.client.HTTPConnection(srv.host, srv.admin_port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hdrs = {"Host": "127.0.0.1:%d" % srv.admin_port}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def status_view(doc):
    """What the page must show of a status document: per deployment its status, running and
    target counts and the replicas' states; per application its status."""
    out = {}
    for an, a in sorted((doc.get("applications") or {}).items()):
        out[an] = {"status": a.get("status"), "deployments": {}}
        for dn, d in sorted((a.get("deployments") or {}).items()):
            reps = d.get("replicas") or []
            out[an]["deployments"][dn] = {
                "status": d.get("status"),
                "running": sum(1 for r in reps if r.get("state") == "RUNNING"),
                "target": d.get("target_num_replicas"),
                "states": sorted(r.get("state") for r in reps)}
    return out


# What the page shows, read from its data-field attributes.
PAGE_VIEW_JS = r"""(() => {
  const q = (sel) => Array.from(document.querySelectorAll(sel));
  const out = {};
  for (const h of q('[data-field="app-name"]')) {
    const an = h.dataset.app;
    const st = document.querySelector('[data-field="app-status"][data-app="' + CSS.escape(an) + '"]');
    out[an] = {status: st ? st.textContent : null, deployments: {}};
  }
  for (const c of q('[data-field="deployment-name"]')) {
    const an = c.dataset.app, dn = c.dataset.deployment;
    const f = (name) => {
      const e = document.querySelector('[data-field="' + name + '"][data-app="' + CSS.escape(an) +
                                       '"][data-deployment="' + CSS.escape(dn) + '"]');
      return e ? e.textContent : null;
    };
    const states = q('[data-field="replica-state"]').filter(
        (e) => e.dataset.app === an && e.dataset.deployment === dn).map((e) => e.textContent).sort();
    (out[an] = out[an] || {status: null, deployments: {}}).deployments[dn] = {
      status: f('deployment-status'), running: Number(f('running')), target: Number(f('target')),
      states: states};
  }
  return out;
})()"""

STAT_JS = r"""((app, field) => {
  const e = document.querySelector('[data-field="' + field + '"][data-app="' + CSS.escape(app) + '"]');
  return e ? e.textContent : null;
})"""


class StaticRouteTest(ServerTestCase):
    APPLICATIONS = [hello_app()]
    EXTRA_CONFIG = {"admin": {"token": TOKEN}}

    def test_redirect(self):
        for method in ("GET", "HEAD"):
            status, h, _ = admin_get(self.server, "/dashboard", method=method)
            self.assertEqual(status, 308, method)
            self.assertEqual(h.get("location"), "/dashboard/")

    def test_files_served_without_token(self):
        for path, name, ctype in (("/dashboard/", "index.html", "text/html; charset=utf-8"),
                                  ("/dashboard/index.html", "index.html",
                                   "text/html; charset=utf-8"),
                                  ("/dashboard/dashboard.js", "dashboard.js",
                                   "text/javascript; charset=utf-8"),
                                  ("/dashboard/dashboard.css", "dashboard.css",
                                   "text/css; charset=utf-8")):
            status, h, body = admin_get(self.server, path)
            self.assertEqual(status, 200, (path, body[:200]))
            self.assertEqual(h.get("content-type"), ctype, path)
            self.assertEqual(h.get("cache-control"), "no-cache", path)
            self.assertEqual(h.get("x-content-type-options"), "nosniff", path)
            self.assertIn("frame-ancestors 'none'", h.get("content-security-policy", ""), path)
            self.assertIn("connect-src 'self'", h.get("content-security-policy", ""), path)
            with open(os.path.join(WEB, name), "rb") as f:
                self.assertEqual(body, f.read(), path)
        # HEAD: the head without the body
        status, h, body = admin_get(self.server, "/dashboard/dashboard.js", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(int(h["content-length"]), os.path.getsize(os.path.join(WEB, "dashboard.js")))
        # a wrong token changes nothing for the page, and the data still needs the right one
        status, _, _ = admin_get(self.server, "/dashboard/", {"Authorization": "Bearer nope"})
        self.assertEqual(status, 200)
        for path in ("/metrics", "/api/serve/applications/", "/api/v1/history", "/dashboardx",
                     "/dashboard.js"):
            status, h, _ = admin_get(self.server, path)
            self.assertEqual(status, 401, path)
            self.assertEqual(h.get("www-authenticate"), "Bearer", path)
        status, _, _ = admin_get(self.server, "/metrics", {"Authorization": "Bearer " + TOKEN})
        self.assertEqual(status, 200)

    def assertJSONError(self, path, want, method="GET"):
        status, h, body = admin_get(self.server, path, method=method)
        self.assertEqual(status, want, (path, body[:300]))
        self.assertEqual(h.get("content-type"), "application/json", path)
        doc = json.loads(body)
        self.assertTrue(doc.get("error"), doc)
        self.assertEqual(doc.get("request_id"), h.get("x-request-id"), doc)
        self.assertNotIn(b"root:", body)
        return doc

    def test_missing_and_unknown_types_are_404(self):
        doc = self.assertJSONError("/dashboard/nope.js", 404)
        self.assertIn("nope.js", doc["error"])
        # the folder holds nothing else, and no other type is served even if it did
        for path in ("/dashboard/missing.html", "/dashboard/sub/dir/x.css", "/dashboard/app.lua",
                     "/dashboard/index", "/dashboard/index.html.bak", "/dashboard/README"):
            doc = self.assertJSONError(path, 404)
            self.assertNotIn(WEB, doc["error"])  # no path of this machine without the token

    def test_traversal_refused(self):
        for path in ("/dashboard/../metrics", "/dashboard/..", "/dashboard/../../etc/passwd",
                     "/dashboard/%2e%2e/%2e%2e/etc/passwd", "/dashboard/..%2fconfig.yaml",
                     "/dashboard//etc/passwd", "/dashboard/.hidden.js", "/dashboard/a/../index.html",
                     "/dashboard/./index.html", "/dashboard/index.html%00.js",
                     "/dashboard/x\\..\\y.js", "/dashboard/" + "a" * 200 + ".js"):
            self.assertJSONError(path, 400)

    def test_other_methods_405(self):
        for method in ("POST", "PUT", "DELETE"):
            status, h, _ = admin_get(self.server, "/dashboard/", method=method)
            self.assertEqual(status, 405, method)
            self.assertEqual(h.get("allow"), "GET, HEAD")

    def test_host_rule_applies(self):
        status, _, body = admin_get(self.server, "/dashboard/", {"Host": "evil.example:%d"
                                                                 % self.server.admin_port})
        self.assertEqual(status, 403, body)
        status, _, _ = admin_get(self.server, "/dashboard/", {"Origin": "http://evil.example"})
        self.assertEqual(status, 403)


class DashboardDirOverrideTest(unittest.TestCase):

    def test_env_replaces_the_folder(self):
        folder = tempfile.mkdtemp(prefix="moonserve-dash-")
        self.addCleanup(shutil.rmtree, folder, True)
        with open(os.path.join(folder, "index.html"), "w") as f:
            f.write("<p>override</p>")
        srv = start_server(self, [hello_app()], env={"MOONSERVE_DASHBOARD_DIR": folder})
        status, h, body = admin_get(srv, "/dashboard/")
        self.assertEqual((status, body), (200, b"<p>override</p>"))
        status, _, _ = admin_get(srv, "/dashboard/dashboard.js")
        self.assertEqual(status, 404)
        os.unlink(os.path.join(folder, "index.html"))
        status, _, _ = admin_get(srv, "/dashboard/")
        self.assertEqual(status, 404)
        self.assertIn("dashboard not found: %s/index.html" % folder, srv.stderr_text())


AUTOSCALE = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
             "target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 120,
             "metrics_interval_s": 0.1, "look_back_period_s": 0.5}


class DashboardPageTest(ServerTestCase):
    APPLICATIONS = [
        hello_app("hello", "/hello", {"autoscaling_config": AUTOSCALE,
                                      "graceful_shutdown_timeout_s": 2,
                                      "graceful_shutdown_wait_loop_s": 0.2}),
        hello_app("other", "/other", {"num_replicas": 1}),
    ]
    EXTRA_CONFIG = {"admin": {"token": TOKEN}, "control_loop": {"interval_s": 0.05}}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            cls.browser = Chromium()
        except BaseException:
            super().tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.browser.close()
        finally:
            super().tearDownClass()

    def url(self, fragment=""):
        return "http://127.0.0.1:%d/dashboard/%s" % (self.server.admin_port, fragment)

    def wait_page(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            time.sleep(0.1)
        text = self.browser.evaluate("document.body.innerText")
        self.fail("%s not shown within %.0fs; page:\n%s\nerrors: %s"
                  % (what, timeout, text[:3000], self.browser.console_errors()))

    def test_1_without_token(self):
        self.browser.call("Runtime.evaluate", expression="sessionStorage.clear()")
        self.browser.navigate(self.url())
        self.wait_page(lambda: self.browser.evaluate(
            "document.querySelector('[data-field=connection]').textContent") == "token needed",
            10, "'token needed'")
        notice = self.browser.evaluate("document.getElementById('notice').textContent")
        self.assertIn("needs its token", notice)
        self.assertEqual(self.browser.evaluate("document.querySelectorAll('[data-app]').length"), 0)
        # a wrong token typed in: refused, said so
        self.browser.evaluate("document.getElementById('token').value = 'wrong'; "
                              "document.querySelector('#token-form button[type=submit]').click()")
        self.wait_page(lambda: self.browser.evaluate(
            "document.querySelector('[data-field=connection]').textContent") == "token refused",
            10, "'token refused'")
        # the right one in the fragment of the open page: taken, and the page goes live
        self.browser.evaluate("location.hash = '#token=%s'" % TOKEN)
        self.wait_page(lambda: self.browser.evaluate(
            "document.querySelector('[data-field=connection]').textContent") == "live",
            10, "'live' after #token=")
        self.assertNotIn(TOKEN, self.browser.evaluate("location.href"))
        self.assertEqual(self.browser.evaluate("sessionStorage.getItem('moonserve.admin.token')"),
                         TOKEN)
        self.browser.evaluate("sessionStorage.clear()")

    def test_2_parser_and_quantiles(self):
        self.browser.navigate(self.url())
        text = ('# HELP x y\n# TYPE moonserve_http_requests_total counter\n'
                'moonserve_http_requests_total{application="a",deployment="D",route="/a",'
                'method="GET",status_class="2xx"} 7\n'
                'moonserve_http_requests_total{application="a",deployment="D",route="/a",'
                'method="POST",status_class="5xx"} 3\n'
                'moonserve_http_error_requests_total{application="a",deployment="D",route="/a",'
                'method="POST",status_class="5xx"} 3\n'
                'moonserve_http_requests_total{application="q\\"x\\\\y",deployment="D",'
                'route="/a",method="GET",status_class="2xx"} 1\n')
        for le, n in (("0.001", 0), ("0.01", 4), ("0.1", 9), ("1", 10), ("+Inf", 10)):
            text += ('moonserve_http_request_duration_seconds_bucket{application="a",'
                     'deployment="D",route="/a",status_class="2xx",le="%s"} %d\n' % (le, n))
        got = self.browser.evaluate(
            "(() => { const L = window.moonserveDashboard.lib; const s = L.summarize("
            "L.parseMetrics(%s)); const a = s.apps.a; return {req: a.req, err: a.err, "
            "names: Object.keys(s.apps).sort(), p50: L.quantile(0.5, a.buckets, {}), "
            "p99: L.quantile(0.99, a.buckets, {}), p50d: L.quantile(0.5, a.buckets, "
            "{'0.001': 0, '0.01': 4, '0.1': 4, '1': 4, '+Inf': 4}), "
            "none: L.quantile(0.5, a.buckets, a.buckets)}; })()" % json.dumps(text))
        self.assertEqual(got["req"], 10)
        self.assertEqual(got["err"], 3)
        self.assertEqual(got["names"], ["a", 'q"x\\y'])
        # rank 5 of 10: 4 below 0.01, 5 in (0.01, 0.1] -> 0.01 + 0.09 * 1/5
        self.assertAlmostEqual(got["p50"], 0.01 + 0.09 * 1 / 5)
        # rank 9.9: 9 below 0.1, one in (0.1, 1] -> 0.1 + 0.9 * 0.9
        self.assertAlmostEqual(got["p99"], 0.1 + 0.9 * 0.9)
        # over the increase only: 5 in (0.01, 0.1], then 1 in (0.1, 1]; rank 3 -> 0.01 + 0.09*3/5
        self.assertAlmostEqual(got["p50d"], 0.01 + 0.09 * 3 / 5)
        self.assertIsNone(got["none"])  # no request in the window

    def test_3_live_values_match_the_admin_api(self):
        srv = self.server
        # a reload first: every script at version 2, the last reload ok
        code, body = srv.reload()
        self.assertEqual(code, 200, body)
        load = LoadGen(srv, "/hello/load?sleep=0.3&w={i}", 4)
        errors = LoadGen(srv, "/other/boom", 1)
        load.start()
        errors.start()
        self.addCleanup(errors.stop)
        self.addCleanup(load.stop)
        self.browser.navigate("about:blank")
        self.browser.navigate(self.url("#token=%s&interval=1000" % TOKEN))
        # the token left the address bar at once and lives in this tab's sessionStorage
        self.assertNotIn(TOKEN, self.browser.evaluate("location.href"))
        self.assertEqual(self.browser.evaluate("sessionStorage.getItem('moonserve.admin.token')"),
                         TOKEN)
        srv.wait_status("hello", "Hello", lambda d: d.get("target_num_replicas") == 3 and
                        sum(1 for r in d["replicas"] if r["state"] == "RUNNING") == 3,
                        timeout=30, what="3 running replicas under load")

        # The page's view equals the status document's, read just before and after it (a poll
        # may land between two reads: then try again).
        last = {}

        def matches():
            before = status_view(srv.status())
            page = self.browser.evaluate(PAGE_VIEW_JS)
            after = status_view(srv.status())
            last.update(before=before, page=page)
            return before == after == page and \
                page["hello"]["deployments"]["Hello"]["running"] == 3
        deadline = time.monotonic() + 20
        while not matches():
            if time.monotonic() > deadline:
                self.fail("page shows %s\nstatus says %s" % (json.dumps(last.get("page")),
                                                               json.dumps(last.get("before"))))
            time.sleep(0.2)
        self.assertEqual(sorted(last["page"]), ["hello", "other"])
        self.assertEqual(last["page"]["hello"]["deployments"]["Hello"]["target"], 3)

        # rates from the counters' increase between polls
        def stat(app, field):
            return self.browser.evaluate("%s(%s, %s)" % (STAT_JS, json.dumps(app),
                                                         json.dumps(field)))

        def number(app, field):
            t = stat(app, field) or ""
            try:
                return float(t.split()[0])
            except (ValueError, IndexError):
                return None
        self.wait_page(lambda: (number("hello", "req-rate") or 0) > 1 and
                       (number("other", "err-rate") or 0) > 0 and
                       number("hello", "p50") is not None and number("hello", "p99") is not None,
                       15, "request and error rates above zero with p50/p99")
        # sleep=0.3 per request: neither quantile can be below 300 ms (buckets: 200 < x <= 300
        # and 300 < x <= 400, so interpolation may answer a little under)
        self.assertGreaterEqual(number("hello", "p50"), 250, stat("hello", "p50"))
        self.assertGreaterEqual(number("hello", "p99"), number("hello", "p50"))
        self.assertLess(number("hello", "p99"), 1000, stat("hello", "p99"))
        # every request to other fails: 100 % errors there, none on hello
        self.assertIn("(100%)", stat("other", "err-rate"))
        self.assertEqual(stat("hello", "err-rate").split()[0], "0.00")
        # the deployment's own rate too
        self.wait_page(lambda: float(self.browser.evaluate(
            "document.querySelector('[data-field=dep-req-rate][data-deployment=Hello]')"
            ".textContent").replace("–", "0")) > 0, 10, "Hello's request rate")

        # plots: one SVG path per series with data
        charts = self.browser.evaluate(
            "Array.from(document.querySelectorAll('[data-app=hello] svg.chart')).map("
            "(s) => [s.getAttribute('aria-label'), s.querySelectorAll('path.line').length])")
        self.assertEqual([c[0] for c in charts], ["Requests", "Latency", "Replicas"], charts)
        self.assertTrue(all(n >= 1 for _, n in charts), charts)

        # scripts: the versions of the status document, and the reload's result
        doc = srv.status()
        router = doc["applications"]["hello"]["deployments"]["Hello"]["router"]
        self.assertEqual(router["version"], 2, router)
        shown = self.browser.evaluate(
            "Array.from(document.querySelectorAll('[data-field=script-version]')).map("
            "(e) => [e.dataset.kind, e.dataset.app, e.dataset.deployment, e.textContent])")
        self.assertIn(["router", "hello", "Hello", "2"], shown)
        self.assertTrue(all(v == "2" for _, _, _, v in shown), shown)
        self.assertEqual(self.browser.evaluate(
            "document.querySelector('[data-field=reload-result]').textContent"), "ok")

        # decisions and history: the engine's history when it has one
        hist = srv.admin_request("GET", "/api/v1/history")
        source = self.browser.evaluate("document.getElementById('decisions-source').textContent")
        if hist.status == 404:
            self.assertIn("history not available", source)
            self.assertIn("history not available", self.browser.evaluate(
                "document.getElementById('lifecycle').textContent"))
        else:
            self.assertEqual(hist.status, 200, hist)
            self.assertIn("from GET /api/v1/history", source)
        self.wait_page(lambda: self.browser.evaluate(
            "Array.from(document.querySelectorAll('[data-field=decision-reason]')).length") > 0,
            10, "scaling decisions with reasons")
        reasons = self.browser.evaluate(
            "Array.from(document.querySelectorAll('[data-field=decision-reason]'))"
            ".map((e) => e.textContent)")
        self.assertTrue(any(r for r in reasons), reasons)
        self.assertEqual(self.browser.evaluate(
            "document.querySelector('[data-field=connection]').textContent"), "live")
        self.assertEqual(self.browser.console_errors(), [])

        shot = self.browser.screenshot(os.path.join(srv.dir, "dashboard.png"))
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        keep = os.environ.get("MOONSERVE_DASHBOARD_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)
        load.stop()
        errors.stop()
        self.assertEqual(load.failures, [])

    def test_4_history_when_present(self):
        # GET /api/v1/history with the shape docs/dashboard.md reads, answered in the page
        # (whatever the engine says today), so the page's use of it is checked either way.
        now = time.time()
        hist = {
            "autoscaling": [{"time": now - 2, "application": "hello", "deployment": "Hello",
                             "scope": "deployment", "policy_version": 3,
                             "inputs": {"total_requests": 9}, "raw_target": 4.5,
                             "applied_target": 3, "previous_target": 2,
                             "bounds": {"min_replicas": 1, "max_replicas": 3},
                             "factors": {}, "reason": "upscale 2 -> 3 (history)"}],
            "reloads": [{"time": now - 30, "kind": "reload", "requested_by": "api",
                         "changed": [], "result": "ok", "error": None, "version": 2},
                        {"time": now - 1, "kind": "reload", "requested_by": "sighup",
                         "changed": [], "result": "failed",
                         "error": "policy.lua:3: '=' expected", "version": 2}],
            "lifecycle": [{"time": now - 5, "application": "hello", "deployment": "Hello",
                           "replica": "7", "event": "STARTED", "reason": "upscale"}]}
        self.browser.navigate("about:blank")
        self.browser.navigate(self.url("#token=%s&interval=500" % TOKEN))
        self.browser.evaluate(
            "(() => { const real = window.fetch; window.fetch = (url, opts) => "
            "String(url).startsWith('/api/v1/history') ? Promise.resolve(new Response(%s, "
            "{status: 200, headers: {'Content-Type': 'application/json'}})) : real(url, opts); "
            "})()" % json.dumps(json.dumps(hist)))
        # the engine has the endpoint now: the page may show its real answer until the next
        # poll reads the injected one
        def reasons():
            return self.browser.evaluate(
                "Array.from(document.querySelectorAll('[data-field=decision-reason]'))"
                ".map((e) => e.textContent)")
        self.wait_page(lambda: reasons() == ["upscale 2 -> 3 (history)"], 10, "the history's data")
        self.assertIn("from GET /api/v1/history", self.browser.evaluate(
            "document.getElementById('decisions-source').textContent"))
        self.assertEqual(self.browser.evaluate(
            "document.querySelector('[data-field=reload-result]').textContent"), "failed")
        self.assertIn("policy.lua:3: '=' expected", self.browser.evaluate(
            "document.querySelector('[data-field=reload-detail]').textContent"))
        self.assertIn("by sighup", self.browser.evaluate(
            "document.querySelector('[data-field=reload-detail]').textContent"))
        self.assertEqual(self.browser.evaluate(
            "Array.from(document.querySelectorAll('[data-field=lifecycle-event]'))"
            ".map((e) => e.textContent)"), ["STARTED"])
        self.assertEqual(self.browser.console_errors(), [])


if __name__ == "__main__":
    harness.main()
