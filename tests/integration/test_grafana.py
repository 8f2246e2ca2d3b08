"""The Grafana dashboard (dashboards/grafana/moonserve.json, docs/metrics.md "Grafana") asks only
for what the engine exports: every metric name in every PromQL expression and template-variable
query is a family a live engine declares on GET /metrics (histograms only through their
_bucket/_sum/_count series, rate() and increase() only over counters and histogram series), and
every label the queries select on or group by is on that metric's samples. The JSON has the shape
Grafana 10 imports: unique panel ids, grid positions that fit and do not overlap, targets with
expressions on the ${datasource} variable, and a templating list that defines every variable the
queries use. The checker is tested on made-up names and labels too, so a dashboard that drifts
from the engine fails here."""

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import harness
from harness import hello_app, run_threads, wait_until

DASHBOARD = os.path.join(harness.SOURCE_DIR, "dashboards", "grafana", "moonserve.json")

# Labels Prometheus itself puts on every scraped series: the dashboard may use them (legends,
# per-engine series) although /metrics does not carry them.
TARGET_LABELS = {"instance", "job"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s",
                    "__range_ms", "__dashboard", "__from", "__to"}

# PromQL's functions and aggregation operators (prometheus.io/docs/prometheus/latest/querying/).
# An identifier followed by "(" must be one of these: a typo in a function name is reported.
FUNCTIONS = set("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time days_in_month day_of_month day_of_week day_of_year
deg delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour
idelta increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
max_over_time min_over_time minute month pi predict_linear present_over_time quantile_over_time
rad rate resets round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt
stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio
""".split())
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
GROUPING = re.compile(r'\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)')
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def strip_grafana_variables(expr):
    """Grafana substitutes $name, ${name[:fmt]} and [[name]] before PromQL sees the text."""
    return re.sub(r'\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\]', "VAR", expr)


def grafana_variables(expr):
    """The names of the Grafana variables an expression uses."""
    return {a or b for a, b in re.findall(
        r'\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)', expr)}


def parse_promql(expr):
    """What a PromQL expression reads: ([(metric, {labels it selects on}), ...],
    {labels it groups or matches by}, [(function, metric), ...] for the counter functions,
    [unknown function names]). Strings, durations, numbers, keywords and Grafana variables are
    not metrics; `{__name__=...}` selectors are refused rather than guessed at."""
    s = strip_grafana_variables(expr)
    if "__name__" in s:
        raise AssertionError("__name__ selectors are not checked; name the metric: %r" % expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)
    s = re.sub(r'\[[^\]]*\]', " ", s)                        # ranges and subqueries
    s = re.sub(r'\boffset\s+-?[0-9a-zA-Z]+', " ", s)          # offset 5m
    s = re.sub(r'@\s*(start\(\)|end\(\)|[0-9.]+)', " ", s)    # @ modifiers
    grouping = set()
    for _, names in GROUPING.findall(s):
        grouping |= {n.strip() for n in names.split(",") if n.strip()}
    s = GROUPING.sub(" ", s)
    metrics, counter_calls, unknown = [], [], []
    token = re.compile(r'\s+|(?P<num>(?:0x[0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+))'
                       r'|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<sel>\{[^{}]*\})|(?P<other>.)')
    last_func = None
    for m in token.finditer(s):
        if m.group("ident"):
            name, rest = m.group("ident"), s[m.end():].lstrip()
            if rest.startswith("("):
                if name not in FUNCTIONS:
                    unknown.append(name)
                last_func = name
                continue
            if name.lower() in KEYWORDS or name == "VAR":
                continue
            labels = set()
            if rest.startswith("{"):
                sel = re.match(r'\{[^{}]*\}', rest).group(0)
                labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)', sel))
            metrics.append((name, labels))
            if last_func in COUNTER_FUNCTIONS:
                counter_calls.append((last_func, name))
            last_func = None
        elif m.group("sel"):
            if not metrics or not re.search(r'[a-zA-Z0-9_:]\s*$', s[:m.start()]):
                raise AssertionError("a selector with no metric name: %r" % expr)
        elif m.group("other") and m.group("other") not in "(":
            last_func = None
    return metrics, grouping, counter_calls, unknown


def parse_exposition(text):
    """({family: type} from # TYPE lines, {series name: {label names on its samples}})."""
    types, labels = {}, {}
    for line in text.splitlines():
        m = re.match(r'# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (\w+)$', line)
        if m:
            types[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? \S+$', line)
        if not m:
            raise AssertionError("not a sample line: %r" % line)
        names = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
        labels.setdefault(m.group(1), set()).update(names)
    return types, labels


def family_of(name, types):
    """(family, its type) that series `name` belongs to, or (None, None)."""
    if name in types and types[name] not in ("histogram", "summary"):
        return name, types[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[:-len(suffix)]
        if name.endswith(suffix) and types.get(base) == "histogram":
            return base, "histogram"
    return None, None


def check_expr(expr, types, series_labels, extra_labels=()):
    """Every problem with one expression against a scrape, as sentences (empty: none)."""
    problems = []
    metrics, grouping, counter_calls, unknown = parse_promql(expr)
    for f in unknown:
        problems.append("%s: not a PromQL function" % f)
    if not metrics:
        problems.append("no metric in %r" % expr)
    for name, selected in metrics:
        family, kind = family_of(name, types)
        if family is None:
            if types.get(name) == "histogram":
                problems.append("%s: a histogram, only its _bucket/_sum/_count series exist"
                                % name)
            else:
                problems.append("%s: no such family on /metrics" % name)
            continue
        if name not in series_labels:
            problems.append("%s: declared but no samples, so its labels cannot be checked "
                            "(the test must make the engine export it)" % name)
            continue
        have = series_labels[name] | TARGET_LABELS
        for label in sorted((selected | grouping | set(extra_labels)) - have):
            problems.append("%s: no label %r (it has %s)" % (name, label,
                                                            sorted(series_labels[name])))
    for func, name in counter_calls:
        family, kind = family_of(name, types)
        if kind not in (None, "counter", "histogram"):
            problems.append("%s(%s): %s is a %s, not a counter" % (func, name, name, kind))
    return problems


def dashboard_panels(dash):
    """Every panel, those inside collapsed rows included."""
    for p in dash.get("panels", []):
        yield p
        for inner in p.get("panels", []) or []:
            yield inner


def variable_query(var):
    q = var.get("query")
    return q.get("query") if isinstance(q, dict) else q


def dashboard_queries(dash):
    """[(where, expr, labels the query needs beyond its selectors)] of the whole dashboard."""
    out = []
    for p in dashboard_panels(dash):
        for t in p.get("targets", []) or []:
            out.append(("panel %s %r target %s" % (p.get("id"), p.get("title"), t.get("refId")),
                        t.get("expr", ""), ()))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = variable_query(v) or ""
        m = re.match(r'\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$', q, re.S)
        if m:
            out.append(("variable %s" % v["name"], m.group(1), (m.group(2),)))
        else:
            out.append(("variable %s" % v["name"], q, ()))
    return out


def check_dashboard(dash, types, series_labels):
    problems = []
    for where, expr, extra in dashboard_queries(dash):
        problems += ["%s: %s" % (where, p) for p in check_expr(expr, types, series_labels, extra)]
    return problems


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


# A scrape small enough to write by hand, for the checker's own tests.
FAKE_SCRAPE = '''# HELP a_total A counter.
# TYPE a_total counter
a_total{application="x",status_class="2xx"} 1
# HELP g A gauge.
# TYPE g gauge
g{application="x",deployment="D"} 2
# HELP h_seconds A histogram.
# TYPE h_seconds histogram
h_seconds_bucket{application="x",le="0.1"} 1
h_seconds_bucket{application="x",le="+Inf"} 1
h_seconds_sum{application="x"} 0.05
h_seconds_count{application="x"} 1
# HELP declared_only_total Nothing yet.
# TYPE declared_only_total counter
'''


class CheckerTest(unittest.TestCase):
    """The checker itself: what it accepts, and that it reports made-up names and labels."""
    maxDiff = None

    def setUp(self):
        self.types, self.labels = parse_exposition(FAKE_SCRAPE)

    def check(self, expr, extra=()):
        return check_expr(expr, self.types, self.labels, extra)

    def test_parser_skips_functions_keywords_labels_strings_and_variables(self):
        metrics, grouping, calls, unknown = parse_promql(
            'histogram_quantile(0.99, sum by (le, application) (rate(h_seconds_bucket'
            '{application=~"$application", deployment!="a_total"}[$__rate_interval] offset 5m)))'
            ' / on (application) group_left (deployment) (1 - g{deployment=~"${deployment:regex}"})'
            ' and sum(a_total) without (status_class) > bool 1e3')
        self.assertEqual(metrics, [("h_seconds_bucket", {"application", "deployment"}),
                                   ("g", {"deployment"}), ("a_total", set())])
        self.assertEqual(grouping, {"le", "application", "deployment", "status_class"})
        self.assertEqual(calls, [("rate", "h_seconds_bucket")])
        self.assertEqual(unknown, [])

    def test_accepts_what_the_scrape_has(self):
        self.assertEqual(self.check(
            'histogram_quantile(0.5, sum by (le, application) (rate(h_seconds_bucket[5m])))'), [])
        self.assertEqual(self.check('rate(h_seconds_sum[5m]) / rate(h_seconds_count[5m])'), [])
        self.assertEqual(self.check('sum by (status_class, instance) (rate(a_total[1m]))'), [])
        self.assertEqual(self.check('g{application="x"}', extra=("deployment",)), [])

    def test_reports_a_made_up_metric(self):
        self.assertEqual(self.check('sum(rate(moonserve_made_up_total{application="x"}[5m]))'),
                         ["moonserve_made_up_total: no such family on /metrics"])
        # a suffix does not make a made-up name real, nor a counter a histogram
        self.assertEqual(self.check('rate(a_total_bucket[5m])'),
                         ["a_total_bucket: no such family on /metrics"])

    def test_reports_a_made_up_label(self):
        got = self.check('sum by (nope) (rate(a_total{zone="eu"}[5m]))')
        self.assertEqual(len(got), 2, got)
        self.assertIn("a_total: no label 'nope'", got[0])
        self.assertIn("a_total: no label 'zone'", got[1])
        self.assertIn("no label 'cluster'", self.check('g', extra=("cluster",))[0])

    def test_reports_misused_kinds(self):
        self.assertEqual(self.check('histogram_quantile(0.5, rate(h_seconds[5m]))'),
                         ["h_seconds: a histogram, only its _bucket/_sum/_count series exist"])
        self.assertEqual(self.check('rate(g[5m])'), ["rate(g): g is a gauge, not a counter"])
        self.assertEqual(self.check('rates(a_total[5m])'), ["rates: not a PromQL function"])
        self.assertIn("declared but no samples", self.check('rate(declared_only_total[5m])')[0])

    def test_reports_a_broken_dashboard(self):
        """The real dashboard with one expression and one variable query made up."""
        dash = load_dashboard()
        bad = copy.deepcopy(dash)
        target = next(p for p in dashboard_panels(bad) if p.get("targets"))["targets"][0]
        target["expr"] = 'sum(rate(moonserve_made_up_total[5m]))'
        var = next(v for v in bad["templating"]["list"] if v.get("type") == "query")
        var["query"] = "label_values(g, no_such_label)"
        got = check_dashboard(bad, self.types, self.labels)
        self.assertTrue(any("moonserve_made_up_total: no such family" in p for p in got), got)
        self.assertTrue(any("no label 'no_such_label'" in p for p in got), got)


BATCH_LUA = r'''
local serve = require "moonserve"
local B = serve.deployment { name = "Batched", max_ongoing_requests = 16 }
B.run = serve.batch({ max_batch_size = 4, batch_wait_timeout_s = 0.05 }, function(self, items)
  local out = {}
  for i, it in ipairs(items) do out[i] = { v = it.v, size = #items } end
  return out
end)
function B:__call(req) return self:run({ v = req.query.v }) end
return { app = B:bind() }
'''

FAST_STATS = {"request_routing_stats_period_s": 0.2}
ROUTER = os.path.join(harness.SOURCE_DIR, "scripts", "routers", "least_loaded.lua") + ":LeastLoaded"


class DashboardTest(harness.ServerTestCase):
    """One engine that exports every family the dashboard reads: a router script (script_*),
    an autoscaling deployment (autoscaling_*), a batched method (batch_*), fake GPUs (gpu_*),
    and requests that succeed and fail (the request counters and histograms)."""

    APPLICATIONS = [
        hello_app(deployment={"num_replicas": 1, "request_router_config": dict(
            FAST_STATS, request_router_class=ROUTER)}),
        hello_app(name="auto", route_prefix="/auto", deployment={
            "num_replicas": "auto", "request_router_config": FAST_STATS,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                   "target_ongoing_requests": 2, "metrics_interval_s": 0.1,
                                   "look_back_period_s": 0.3}}),
        {"name": "batch", "route_prefix": "/batch", "import_path": "batch.lua:app",
         "deployments": [{"name": "Batched", "request_router_config": FAST_STATS}]},
    ]
    FILES = {"batch.lua": BATCH_LUA}
    EXTRA_CONFIG = {"control_loop": {"interval_s": 0.05}}
    ENV = {"MOONSERVE_FAKE_GPUS": "A100:81920"}
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        srv = cls.server
        for path, status in (("/hello/x", 200), ("/hello/boom", 500), ("/auto/x", 200),
                             ("/nowhere", 404)):
            r = srv.get(path)
            if r.status != status:
                raise AssertionError("%s answered %r" % (path, r))
        out = run_threads(lambda i: srv.get("/batch/x?v=%d" % i, timeout=20),
                          [(i,) for i in range(4)], 30)
        if not all(r and r.status == 200 for r, _ in out):
            raise AssertionError("batched requests: %r" % out)

        # Batch stats reach the controller with a stats poll and the autoscaling decision with
        # a control-loop tick: wait for both rather than for a fixed time.
        def ready():
            text = srv.admin_request("GET", "/metrics").body.decode()
            return text if all(name + "{" in text for name in (
                "moonserve_batch_actual_size_bucket", "moonserve_autoscaling_desired_replicas",
                "moonserve_gpu_utilization", "moonserve_deployment_error_requests_total",
                "moonserve_http_error_requests_total")) else None
        cls.text = wait_until(ready, 15)
        if not cls.text:
            raise AssertionError("metrics never complete:\n" +
                                 srv.admin_request("GET", "/metrics").body.decode())
        cls.types, cls.series_labels = parse_exposition(cls.text)

    def test_every_query_reads_exported_metrics_and_labels(self):
        dash = load_dashboard()
        queries = dashboard_queries(dash)
        self.assertGreater(len(queries), 20)
        self.assertEqual(check_dashboard(dash, self.types, self.series_labels), [])
        # the dashboard covers what the task asked of it: these families are all read
        read = {family_of(name, self.types)[0] for _, expr, _ in queries
                for name, _ in parse_promql(expr)[0]}
        for family in ("moonserve_http_requests_total", "moonserve_http_error_requests_total",
                       "moonserve_http_request_duration_seconds",
                       "moonserve_deployment_running_replicas",
                       "moonserve_deployment_target_replicas",
                       "moonserve_autoscaling_desired_replicas",
                       "moonserve_deployment_queued_requests", "moonserve_batch_actual_size",
                       "moonserve_script_reloads_total", "moonserve_script_memory_bytes",
                       "moonserve_event_loop_idle_seconds_total", "moonserve_gpu_utilization",
                       "moonserve_gpu_memory_used_bytes"):
            self.assertIn(family, read)

    def test_a_made_up_name_in_the_dashboard_is_reported_against_the_live_scrape(self):
        dash = load_dashboard()
        p = next(p for p in dashboard_panels(dash) if p.get("targets"))
        p["targets"].append({"refId": "Z", "expr": "rate(moonserve_http_requestz_total[5m])"})
        self.assertEqual(check_dashboard(dash, self.types, self.series_labels),
                         ["panel %s %r target Z: moonserve_http_requestz_total: no such family "
                          "on /metrics" % (p["id"], p["title"])])

    def test_the_scrape_is_what_prometheus_takes(self):
        harness.assert_promtool_accepts(self, self.text)


def as_plain_promql(expr):
    """The text Prometheus would get: Grafana's range variables as a duration, the others (all
    inside label matchers here) as a regex matching anything."""
    expr = re.sub(r'\$(?:\{)?__(?:rate_interval|interval|range)\}?', "5m", expr)
    return re.sub(r'\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*', ".*", expr)


def promtool_rejects(exprs):
    """`promtool check rules` (Prometheus's own PromQL parser) over one recording rule per
    expression: its complaints, or "" when every expression parses."""
    if not shutil.which("promtool"):
        raise AssertionError("promtool missing: the bootstrap installs Debian's prometheus")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:q%d" % i, "expr": e} for i, e in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="moonserve-rules-") as f:
        json.dump(rules, f)  # JSON is YAML, and keeps every string exactly as it is
        f.flush()
        p = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True,
                           timeout=30)
    return "" if p.returncode == 0 else (p.stdout + p.stderr).decode()


class ShapeTest(unittest.TestCase):
    """The JSON is a dashboard Grafana 10 imports, and its PromQL parses."""

    @classmethod
    def setUpClass(cls):
        cls.dash = load_dashboard()

    def test_every_query_parses_in_prometheus(self):
        exprs = [as_plain_promql(e) for _, e, _ in dashboard_queries(self.dash)]
        self.assertEqual(promtool_rejects(exprs), "")
        self.assertIn('application=~".*"', " ".join(exprs))
        # and the check can fail: a missing parenthesis is a syntax error
        said = promtool_rejects(["up", "sum(rate(up[5m])"])
        self.assertIn('"dashboard:q1": could not parse expression', said)

    def test_top_level(self):
        d = self.dash
        for key in ("title", "uid", "panels", "templating", "time", "schemaVersion"):
            self.assertIn(key, d)
        self.assertIsNone(d.get("id"), "an exported dashboard has no database id")
        self.assertGreaterEqual(d["schemaVersion"], 38)  # Grafana 10.0's
        grafana = [r for r in d.get("__requires", []) if r.get("id") == "grafana"]
        self.assertEqual(len(grafana), 1)
        self.assertEqual(int(grafana[0]["version"].split(".")[0]), 10)
        inputs = [i for i in d.get("__inputs", []) if i.get("type") == "datasource"]
        self.assertEqual([i.get("pluginId") for i in inputs], ["prometheus"])

    def test_panels(self):
        ids, cells = set(), {}
        for p in dashboard_panels(self.dash):
            self.assertIsInstance(p.get("id"), int, p.get("title"))
            self.assertNotIn(p["id"], ids, "duplicate panel id")
            ids.add(p["id"])
            self.assertTrue(p.get("title"), p["id"])
            g = p.get("gridPos")
            self.assertIsInstance(g, dict, p["id"])
            for k in ("h", "w", "x", "y"):
                self.assertIsInstance(g.get(k), int, (p["id"], k))
            self.assertTrue(g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["y"] >= 0, g)
            self.assertLessEqual(g["x"] + g["w"], 24, p["id"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    self.assertNotIn((x, y), cells, "panels %s and %s overlap" %
                                     (cells.get((x, y)), p["id"]))
                    cells[(x, y)] = p["id"]
            if p.get("type") == "row":
                continue
            self.assertIn(p.get("type"), ("timeseries", "stat", "table", "gauge", "bargauge"))
            self.assertEqual(p.get("datasource"), {"type": "prometheus", "uid": "${datasource}"})
            targets = p.get("targets")
            self.assertTrue(targets, "panel %s has no targets" % p["id"])
            refs = [t.get("refId") for t in targets]
            self.assertEqual(len(set(refs)), len(refs), p["id"])
            for t in targets:
                self.assertTrue(t.get("refId"), p["id"])
                self.assertIsInstance(t.get("expr"), str, p["id"])
                self.assertTrue(t["expr"].strip(), p["id"])
                self.assertIn(t.get("datasource", p["datasource"]), (p["datasource"],))
        self.assertGreaterEqual(len(ids), 20)

    def test_templating(self):
        variables = self.dash["templating"]["list"]
        self.assertIsInstance(variables, list)
        by_name = {v["name"]: v for v in variables}
        self.assertEqual(len(by_name), len(variables), "duplicate variable names")
        ds = by_name["datasource"]
        self.assertEqual((ds["type"], ds["query"]), ("datasource", "prometheus"))
        for name in ("application", "deployment"):
            v = by_name[name]
            self.assertEqual(v["type"], "query")
            self.assertEqual(v["datasource"], {"type": "prometheus", "uid": "${datasource}"})
            self.assertRegex(variable_query(v), r'^label_values\(.*, %s\)$' % name)
        # every variable a query uses is defined (Grafana would leave "$x" in the PromQL)
        used = set()
        for _, expr, _ in dashboard_queries(self.dash):
            used |= grafana_variables(expr)
        for p in dashboard_panels(self.dash):
            used |= grafana_variables(json.dumps(p.get("datasource") or ""))
        self.assertEqual(used - GRAFANA_BUILTINS - set(by_name), set())
        self.assertIn("application", used)
        self.assertIn("deployment", used)


if __name__ == "__main__":
    harness.main()
