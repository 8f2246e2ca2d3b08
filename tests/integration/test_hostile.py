"""The hostile corpus (tests/hostile/*.lua) against every kind of policy script on a live engine.

Every case of the corpus is one hostile behaviour (metatable tricks on the tables the engine
shares, nil-ed and retyped fields, replaced metatables, huge / deep / cyclic answers and states,
recursion, memory bombs, pathological patterns, coroutines, non-string and non-UTF-8 errors,
infinite loops, a self_test that loops, ...). tests/hostile/_kinds.lua is appended to each case
(so the case keeps its line numbers) and makes it a router, a deployment-level autoscaling policy,
an application-level policy, an external-scaling judge and an external-scaling tick at once.

One engine per kind runs one application per case, each with its script in a file named after the
case. Every script starts well-behaved; a test arms its case (rewrites the file with the hostile
version, POST /api/v1/reload), exercises it, checks, and disarms it again (the well-behaved version,
reload: that is where a kept state is handed over). For a run-time case it asserts:

* the engine keeps serving: /-/healthz answers 200 and a request to the application gets 200, each
  within a short deadline;
* the built-in takes over (when the case must fail): requests are routed, autoscaling decisions are
  still made and by the built-in policy, the scale request is accepted as Ray Serve would, the
  tick keeps ticking and applies nothing;
* the failure shows in the status document (GET /api/serve/applications/) as the case's file name
  followed by `:LINE`, wherever in the document it sits (also in a `survive` case whose failure
  count rose); every message there that names the file carries a line; the document stays under
  1 MiB;
* the disarming reload is accepted and the engine still answers.

A load-time case (`-- expect: load`) must make `moonserve check` fail with file:line, and a reload
with it must be rejected (422, file:line in the answer) with the old version kept and deciding.

A case's header says what it expects: `fail` (every kind must record a failure), `fail KIND...`
(those kinds must; the others may take the answer as valid), `survive` (no failure required: the
engine must only stay well) or `load`.

If the engine stops answering (hang) or dies (abort), the case fails saying so, the engine is
SIGKILLed by its pid and the next case gets a fresh one.

HOSTILE_ONLY=kind/case[,kind/case...] (shell-style patterns: `router/mt_*`, `*/error_nil`, `judge`)
runs a subset."""

import ctypes
import fnmatch
import glob
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import harness
from harness import hello_app, run_cli

CORPUS_DIR = os.path.join(harness.SOURCE_DIR, "tests", "hostile")
KINDS_LUA = os.path.join(CORPUS_DIR, "_kinds.lua")
KINDS = ("router", "policy", "app_policy", "judge", "tick")

BENIGN_TARGET = 0.75  # what the well-behaved policies answer (tests/hostile/_kinds.lua)
DEADLINE_S = 2.0      # a request, a status read, a scale call: "promptly"
HEALTH_S = 2.0
STATUS_MAX = 1 << 20  # bytes: no message may blow up the status document
FAIL_S = 1.0          # from the calls to the failure showing in status
CHECK_S = 30.0
TICK_S = 0.05
CONTROL = {"control_loop": {"interval_s": TICK_S}}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# the corpus


class Case(object):
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)[:-len(".lua")]
        self.text = read(path)
        m = re.search(r"^-- expect: *(.+)$", self.text, re.M)
        if not m:
            raise AssertionError("%s has no '-- expect:' line" % path)
        words = m.group(1).split()
        self.load_time = words == ["load"]
        if words[0] not in ("fail", "survive", "load") or (words[0] != "fail" and words[1:]):
            raise AssertionError("%s: bad expect line %r" % (path, m.group(0)))
        unknown = set(words[1:]) - set(KINDS)
        if unknown:
            raise AssertionError("%s: unknown kinds %r" % (path, sorted(unknown)))
        self.must_fail = (set(words[1:]) or set(KINDS)) if words[0] == "fail" else set()

    def script(self):
        return self.text.rstrip("\n") + "\n" + KINDS_LUA_TEXT

    def lines(self):
        return self.script().count("\n") + 1


KINDS_LUA_TEXT = read(KINDS_LUA)
BENIGN_TEXT = "-- the well-behaved version of a case\nlocal case = {}\n" + KINDS_LUA_TEXT
CASES = [Case(p) for p in sorted(glob.glob(os.path.join(CORPUS_DIR, "*.lua")))
         if not os.path.basename(p).startswith("_")]


def selected(kind, case):
    only = os.environ.get("HOSTILE_ONLY", "").strip()
    if not only:
        return True
    for pat in only.split(","):
        pat = pat.strip()
        k, _, c = pat.partition("/")
        if fnmatch.fnmatch(kind, k or "*") and fnmatch.fnmatch(case.name, c or "*"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# the configuration of each kind: one application per case, its script in CASE.lua


def app_for(kind, name):
    fn = name + ".lua"
    dep = {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.1}
    autoscaling = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1,
                   "upscale_delay_s": 0, "downscale_delay_s": 0, "metrics_interval_s": 0.1,
                   "look_back_period_s": 0.5}
    app = {}
    if kind == "router":
        dep.update(num_replicas=1, request_router_config={
            "request_router_class": fn + ":Router", "request_router_kwargs": {"k": 1}})
    elif kind == "policy":
        dep["autoscaling_config"] = dict(autoscaling, policy={
            "policy_function": fn + ":policy", "policy_kwargs": {"k": 1}})
    elif kind == "app_policy":
        dep["autoscaling_config"] = autoscaling
        app["autoscaling_policy"] = {"policy_function": fn + ":app_policy",
                                     "policy_kwargs": {"k": 1}}
    elif kind == "judge":
        dep["num_replicas"] = 1
        app.update(external_scaler_enabled=True,
                   external_scaler={"hook": fn + ":judge", "kwargs": {"k": 1}})
    elif kind == "tick":
        dep["num_replicas"] = 1
        app.update(external_scaler_enabled=True,
                   external_scaler={"tick": fn + ":tick", "tick_interval_s": 0.1,
                                    "kwargs": {"k": 1}})
    out = hello_app(name, "/" + name, dep)
    out.update(app)
    return out


# --------------------------------------------------------------------------------------------
# reading the status document without depending on its exact shape


def walk(node):
    """Every (key, value) pair in a JSON document, depth first (list items have key None)."""
    stack = [(None, node)]
    while stack:
        key, v = stack.pop()
        yield key, v
        if isinstance(v, dict):
            stack.extend(v.items())
        elif isinstance(v, list):
            stack.extend((None, x) for x in v)


def strings(node):
    for key, v in walk(node):
        if isinstance(key, str):
            yield key
        if isinstance(v, str):
            yield v


def file_line_re(name):
    return re.compile(r"(?<![\w.-])%s\.lua:(\d+)" % re.escape(name))


def located(node, case):
    """The messages in node that name the case's file with a line inside it."""
    rx = file_line_re(case.name)
    n = case.lines()
    return [s for s in strings(node) for m in [rx.search(s)] if m and 1 <= int(m.group(1)) <= n]


def unlocated(node, case):
    """Messages naming the case's file without a line in it (a path alone is not a message)."""
    rx = file_line_re(case.name)
    needle = case.name + ".lua"
    out = []
    for s in strings(node):
        if needle in s and not s.endswith(needle):
            m = rx.search(s)
            if not m or not 1 <= int(m.group(1)) <= case.lines():
                out.append(s)
    return out


def app_node(doc, app):
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if isinstance(apps, dict) and isinstance(apps.get(app), dict):
        return apps[app]
    if isinstance(apps, list):
        for a in apps:
            if isinstance(a, dict) and a.get("name") == app:
                return a
    raise AssertionError("application %s not in the status document: %s"
                         % (app, json.dumps(doc)[:1500]))


def decisions(node):
    """Every autoscaling decision recorded anywhere under node (dicts with `now`)."""
    out = []
    for key, v in walk(node):
        if key == "recent_decisions" and isinstance(v, list):
            out.extend(d for d in v if isinstance(d, dict) and isinstance(d.get("now"),
                                                                          (int, float)))
    return out


def numbers_at(node, name):
    return [v for key, v in walk(node) if key == name and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def script_versions(node, case):
    """{version} of the script info objects of the case's file under node."""
    out = set()
    for _, v in walk(node):
        if isinstance(v, dict) and str(v.get("path", "")).endswith("/" + case.name + ".lua"):
            if isinstance(v.get("version"), int):
                out.add(v["version"])
    return out


def errors_of(node):
    """The error-ish fields under node, for failure messages only."""
    out = {}
    for key, v in walk(node):
        if isinstance(key, str) and ("error" in key or key == "failures") and v not in (None, ""):
            out.setdefault(key, []).append(v if not isinstance(v, str) else v[:300])
    return out


def short(doc, limit=2500):
    text = json.dumps(doc, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# one engine per kind


def _die_with_parent():
    """In the engine's child process before exec: SIGKILL it when this test process dies. A
    hung engine spins a core; if ctest kills this file at its timeout, no cleanup code runs."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class HostileServer(harness.Server):
    def _spawn(self):
        # harness.Server._spawn, plus _die_with_parent
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        self.proc = subprocess.Popen([harness.BIN, "run", self.config_path], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=self._stdout,
                                     stderr=self._stderr, env=env, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid


class Engine(object):
    def __init__(self, kind, cases):
        self.kind = kind
        self.cases = cases
        files = {c.name + ".lua": BENIGN_TEXT for c in cases}
        self.srv = HostileServer([app_for(kind, c.name) for c in cases], files=files,
                                 extra_config=CONTROL, shutdown_timeout_s=10)
        try:
            self.srv.start()
        except BaseException:
            self.srv.cleanup()
            raise

    def alive(self):
        return self.srv.proc.poll() is None

    def diagnose(self):
        """None while the engine answers /-/healthz in time, else what went wrong."""
        if not self.alive():
            return self.died()
        try:
            r = self.srv.get("/-/healthz", timeout=HEALTH_S)
            if r.status == 200:
                return None
            why = "/-/healthz answered %d" % r.status
        except socket.timeout as e:
            return "hang: /-/healthz did not answer within %.0fs (%s)" % (HEALTH_S, e)
        except Exception as e:  # noqa: a reset or refused connection
            why = "/-/healthz failed (%s: %s)" % (type(e).__name__, e)
        # a reset connection may be a process on its way out
        if self.srv.wait_exit(1.0) is not None:
            return self.died()
        return "hang: " + why

    def died(self):
        return "abort: the engine exited with %r; stderr: %s" % (
            self.srv.proc.returncode, controller_lines(self.srv.stderr_text()))

    def kill(self):
        self.srv.kill_all()
        self.srv.stopped = True
        self.srv.cleanup()

    def stop(self):
        try:
            self.srv.stop()
        finally:
            self.srv.cleanup()


def controller_lines(text, n=2):
    """The controller's last words (the replicas' lines about their lost channel are noise)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and "[replica " not in ln]
    return " | ".join(ln[:400] for ln in lines[-n:]) or "(empty)"


# --------------------------------------------------------------------------------------------
# the tests


class HostileBase(unittest.TestCase):
    KIND = None
    CASES = ()
    engine = None

    @classmethod
    def tearDownClass(cls):
        if cls.engine is not None:
            engine, cls.engine = cls.engine, None
            engine.stop()

    # -- engine lifecycle ----------------------------------------------------------------------

    def engine_for(self, case):
        cls = type(self)
        if cls.engine is not None and not cls.engine.alive():
            cls.engine.kill()
            cls.engine = None
        if cls.engine is None:
            remaining = [c for c in cls.CASES if c.name >= case.name]
            cls.engine = Engine(self.KIND, remaining)
        return cls.engine

    def run_case(self, case):
        engine = self.engine_for(case)
        self.srv = engine.srv
        try:
            self.wait_ready(case)
            if case.load_time:
                self.load_time_case(case)
            else:
                self.run_time_case(case)
        except Exception as e:  # noqa: decide hang / abort / wrong
            down = engine.diagnose()
            if down is None:
                self.disarm_quietly(case)
                raise
            type(self).engine = None
            engine.kill()
            self.fail("%s/%s: %s\n(while: %s: %s)" % (self.KIND, case.name, down,
                                                       type(e).__name__, e))

    def disarm_quietly(self, case):
        """After a failed check on a live engine: the case's script back to well-behaved, so
        that it does not burn the budget of every tick while the next cases run."""
        try:
            self.reload(BENIGN_TEXT, case)
        except Exception:  # noqa: best effort; the failure being reported is the one that counts
            pass

    # -- helpers ---------------------------------------------------------------------------------

    def status(self):
        return self.srv.status(timeout=DEADLINE_S)

    def app_status(self, case):
        return app_node(self.status(), case.name)

    def wait_for(self, pred, timeout, what):
        got = harness.wait_until(pred, timeout, 0.05)
        if not got:
            raise AssertionError("%s/%s: %s not seen within %.1fs" % (
                self.KIND, getattr(self, "case_name", "?"), what, timeout))
        return got

    def wait_ready(self, case):
        self.case_name = case.name

        def running():
            d = self.srv.deployment_status(case.name, "Hello")
            return any(r.get("state") == "RUNNING" for r in d.get("replicas") or [])
        self.wait_for(running, 15, "a RUNNING replica")

    def serves(self, case, n=1):
        for i in range(n):
            path = "/%s/probe%d" % (case.name, i)
            try:
                r = self.srv.get(path, timeout=DEADLINE_S)
            except Exception as e:  # noqa: a timeout, a reset: not answered
                raise AssertionError("%s/%s: GET %s not answered within %.0fs (%s: %s)"
                                     % (self.KIND, case.name, path, DEADLINE_S,
                                        type(e).__name__, e))
            self.assertEqual(r.status, 200, "%s/%s: the application answered %r"
                             % (self.KIND, case.name, r))
        r = self.srv.get("/-/healthz", timeout=HEALTH_S)
        self.assertEqual(r.status, 200, r)

    def reload(self, text, case):
        self.srv.write_file(case.name + ".lua", text)
        return self.srv.reload(timeout=15)

    def scale(self, case, n):
        return self.srv.scale(case.name, "Hello", n, timeout=DEADLINE_S)

    def target(self, case):
        return self.srv.deployment_status(case.name, "Hello").get("target_num_replicas")

    def progress(self, case):
        """A number that grows while the kind's script is being called: the newest decision's
        time (policies), the tick count (tick); None for the kinds the test drives itself."""
        node = self.app_status(case)
        if self.KIND in ("policy", "app_policy"):
            return max([d["now"] for d in decisions(node)] or [0])
        if self.KIND == "tick":
            return max(numbers_at(node, "ticks") or [0])
        return None

    def failures(self, case):
        """The failure counts under the application, summed (a survive case that fails must
        say where too)."""
        return sum(numbers_at(self.app_status(case), "failures"))

    def exercise(self, case, since):
        """Make the engine call the armed script a few times; returns what the calls answered."""
        if self.KIND == "router":
            self.serves(case, 3)
            return None
        if self.KIND == "judge":
            for _ in range(2):  # the second call meets what the first one did
                r = self.scale(case, 2)
                self.assertIn(r.status, (200, 422), "%s: scale answered %r" % (case.name, r))
                r.json()  # the body (a refusal's reason, maybe) is valid JSON
            return r
        if self.KIND in ("policy", "app_policy"):
            # a steady decision refreshes its entry each tick: its time tells the ticks apart
            self.wait_for(lambda: self.progress(case) > since + 3 * TICK_S, 5,
                          "3 ticks of decisions")
            return None
        start = self.progress(case)
        self.wait_for(lambda: self.progress(case) >= start + 3, 5, "3 ticks")
        return None

    # -- a run-time case -------------------------------------------------------------------------

    def run_time_case(self, case):
        kind, name = self.KIND, case.name
        code, body = self.reload(case.script(), case)
        self.assertEqual(code, 200, "%s/%s: arming reload rejected: %s" % (kind, name,
                                                                            short(body)))
        failures_before = self.failures(case)
        armed = time.time()
        answer = self.exercise(case, armed)
        must_fail = kind in case.must_fail or self.failures(case) > failures_before
        if must_fail:
            doc = harness.wait_until(lambda: (lambda d: d if located(d, case) else None)(
                self.status()), FAIL_S, 0.05)
            self.assertTrue(doc, "%s/%s: no %s.lua:LINE in the status document within %.0fs; "
                            "its errors: %s" % (kind, name, name, FAIL_S,
                                                errors_of(self.app_status(case))))
        else:
            doc = self.status()
        bad = unlocated(doc, case)
        self.assertFalse(bad, "%s/%s: messages naming the file without a line: %r"
                         % (kind, name, [s[:300] for s in bad]))
        size = len(json.dumps(doc))
        self.assertLess(size, STATUS_MAX, "%s/%s: the status document grew to %d bytes"
                        % (kind, name, size))
        self.serves(case)
        if kind in case.must_fail:
            self.builtin_took_over(case, answer)
        code, body = self.reload(BENIGN_TEXT, case)
        self.assertEqual(code, 200, "%s/%s: disarming reload rejected: %s" % (kind, name,
                                                                               short(body)))
        self.serves(case)
        if kind == "judge" and self.target(case) != 1:
            self.assertEqual(self.scale(case, 1).status, 200)

    def builtin_took_over(self, case, answer):
        kind = self.KIND
        if kind in ("policy", "app_policy"):
            seen = time.time()

            def builtin_decided():
                ds = [d for d in decisions(self.app_status(case)) if d["now"] > seen]
                return ds and ds[-1]
            d = self.wait_for(builtin_decided, 5, "a decision after the failure")
            self.assertNotEqual(d.get("raw_target"), BENIGN_TARGET,
                                "%s: the script's answer was taken: %r" % (case.name, d))
        elif kind == "judge":
            self.assertEqual(answer.status, 200, "%s: a failing judge must let the request "
                                                 "through: %r" % (case.name, answer))
            self.assertEqual(self.target(case), 2, "%s: the request was not applied"
                             % case.name)
        elif kind == "tick":
            start = self.progress(case)
            self.wait_for(lambda: self.progress(case) > start, 5, "a tick after the failure")
            self.assertEqual(self.target(case), 1, "%s: a failed tick applied a target"
                             % case.name)

    # -- a load-time case ------------------------------------------------------------------------

    def load_time_case(self, case):
        kind, name = self.KIND, case.name
        self.check_fails(case)
        before = script_versions(self.app_status(case), case)
        self.assertTrue(before, "%s: no script info for %s.lua in status" % (kind, name))
        code, body = self.reload(case.script(), case)
        self.assertEqual(code, 422, "%s/%s: a reload with a load-time failure answered %d: %s"
                         % (kind, name, code, short(body)))
        self.assertTrue(located(body, case), "%s/%s: no %s.lua:LINE in the reload answer: %s"
                        % (kind, name, name, short(body)))
        self.serves(case)
        node = self.app_status(case)
        self.assertEqual(script_versions(node, case), before,
                         "%s/%s: the version in force changed: %s" % (kind, name, short(node)))
        bad = unlocated(self.status(), case)
        self.assertFalse(bad, "%s/%s: messages naming the file without a line: %r"
                         % (kind, name, [s[:300] for s in bad]))
        self.old_version_decides(case)
        code, body = self.reload(BENIGN_TEXT, case)
        self.assertEqual(code, 200, "%s/%s: the well-behaved version was rejected: %s"
                         % (kind, name, short(body)))

    def old_version_decides(self, case):
        kind = self.KIND
        if kind in ("policy", "app_policy"):
            since = time.time()
            self.wait_for(lambda: [d for d in decisions(self.app_status(case))
                                   if d["now"] > since and d.get("raw_target") == BENIGN_TARGET],
                          5, "a decision of the old version")
        elif kind == "judge":
            r = self.scale(case, 2)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(self.target(case), 1, "%s: the old judge did not clamp" % case.name)
        elif kind == "tick":
            start = self.progress(case)
            self.wait_for(lambda: self.progress(case) >= start + 2, 5, "ticks of the old version")
        else:
            self.serves(case, 2)

    def check_fails(self, case):
        with tempfile.TemporaryDirectory(prefix="moonserve-hostile-") as d:
            for fname, text in (("hello.lua", harness.HELLO_LUA), (case.name + ".lua",
                                                                   case.script())):
                with open(os.path.join(d, fname), "w") as f:
                    f.write(text)
            path = os.path.join(d, "config.yaml")
            with open(path, "w") as f:
                f.write(harness.to_yaml({"applications": [app_for(self.KIND, case.name)]}))
            try:
                rc, out = run_cli("check", path, timeout=CHECK_S)
            except Exception as e:  # noqa: subprocess.TimeoutExpired
                self.fail("%s/%s: moonserve check did not finish within %.0fs (%s)"
                          % (self.KIND, case.name, CHECK_S, e))
        self.assertNotEqual(rc, 0, "%s/%s: moonserve check passed: %s" % (self.KIND, case.name,
                                                                          out[-1000:]))
        self.assertTrue(located([out], case), "%s/%s: moonserve check did not say %s.lua:LINE:"
                        " %s" % (self.KIND, case.name, case.name, out[-1000:]))


def make_test(case):
    def test(self):
        self.run_case(case)
    test.__doc__ = "%s: %s" % (case.name, case.text.splitlines()[0].lstrip("- "))
    return test


def make_class(kind):
    cases = [c for c in CASES if selected(kind, c)]
    attrs = {"KIND": kind, "CASES": cases}
    for c in cases:
        attrs["test_" + c.name] = make_test(c)
    return type("Hostile_" + kind, (HostileBase,), attrs)


for _kind in KINDS:
    _cls = make_class(_kind)
    if _cls.CASES:
        globals()[_cls.__name__] = _cls
del _kind, _cls


if __name__ == "__main__":
    harness.main()
