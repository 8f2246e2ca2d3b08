"""Async tasks through a real redis-server (docs/tasks.md): the built-in endpoints submit, read
and cancel; consumers run the deployment's task handlers; delivery is at least once.

- submit -> 202 with an id; the handler runs; SUCCESS with its result, attempts and timestamps.
- progress reported by a running handler is in its status.
- a handler that keeps failing is retried max_retries times, then FAILURE, parked in the
  failed-task stream; an unknown task name is FAILURE "unprocessable", parked in its stream.
- cancel of a running task: REVOKED, and the handler stops (its progress stops moving); cancel
  of an ended task is 409; unknown ids are 404.
- deployment code submits and reads tasks (serve.tasks) through the controller.
- a consumer replica killed mid-task: the task runs again and succeeds.
- Redis down: submits and status answer 503 (JSON, request id); when Redis is back, both work
  again without a restart.
- clients may not send X-Moonserve-Task; bad task_queue config is a file:line:col error.
"""

import json
import os
import signal
import unittest

import harness
from harness import run_cli, start_redis, wait_until

TASKS_LUA = r'''
local serve = require "moonserve"

local Worker = serve.deployment { name = "Worker", max_ongoing_requests = 8 }
Worker.add = serve.task_handler(function(self, a, b) return { sum = a + b } end)
Worker.slow = serve.task_handler(function(self, steps)
  for i = 1, steps do
    serve.task_progress({ step = i, of = steps })
    serve.sleep(0.05)
  end
  return "done " .. steps
end)
Worker.flaky = serve.task_handler(function(self) error("always fails", 0) end)
Worker.ctx = serve.task_handler("context", function(self, x, kw)
  local c = serve.get_task_context()
  return { name = c.name, attempt = c.attempt, id = c.task_id, x = x, kw = kw }
end)
function Worker:__call() return "worker" end

local Front = serve.deployment { name = "Front" }
function Front:__call(req)
  if req.path:find("submit") then
    return { id = serve.tasks.enqueue("jobs", "add", { 20, 22 }) }
  elseif req.path:find("status") then
    return serve.tasks.status("jobs", req.query.id)
  elseif req.path:find("bad") then
    local ok, err = pcall(serve.tasks.status, "jobs", "nope")
    return { ok = ok, err = tostring(err) }
  end
  return "front"
end
return { app = Front:bind(), worker = Worker:bind() }
'''


def apps(redis_url):
    return [
        {"name": "front", "route_prefix": "/front", "import_path": "tasks.lua:app"},
        {"name": "work", "route_prefix": None, "import_path": "tasks.lua:worker",
         "deployments": [{"name": "Worker", "task_queue": {
             "queue_name": "jobs", "broker_url": redis_url, "max_retries": 2,
             "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.1,
             "failed_task_queue_name": "jobs-failed",
             "unprocessable_task_queue_name": "jobs-bad", "visibility_timeout_s": 2}}]},
    ]


class TasksTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.redis = start_redis(cls)
        cls.server = harness.Server(apps(cls.redis.url), files={"tasks.lua": TASKS_LUA},
                                    extra_config={"control_loop": {"interval_s": 0.05}})
        cls.addClassCleanup(cls.server.cleanup)
        cls.server.start()

    def submit(self, name, args=None, kwargs=None, status=202):
        body = {"name": name}
        if args is not None:
            body["args"] = args
        if kwargs is not None:
            body["kwargs"] = kwargs
        r = self.server.request("POST", "/-/tasks/jobs", body=json.dumps(body).encode())
        self.assertEqual(r.status, status, r)
        return r.json().get("task_id") if status == 202 else r

    def status(self, tid, code=200):
        r = self.server.get("/-/tasks/jobs/" + tid)
        self.assertEqual(r.status, code, r)
        return r.json()

    def wait_status(self, tid, want, timeout=20):
        seen = []

        def done():
            st = self.status(tid)
            seen.append(st)
            return st["status"] in want and st
        st = wait_until(done, timeout)
        self.assertTrue(st, "task %s never reached %s: %r" % (tid, want, seen[-3:]))
        return st

    def test_submit_runs_to_success(self):
        tid = self.submit("add", [2, 3])
        self.assertRegex(tid, r"^[0-9a-f]{32}$")
        st = self.wait_status(tid, ("SUCCESS",))
        self.assertEqual(st["result"], {"sum": 5})
        self.assertEqual(st["attempts"], 1)
        self.assertEqual(st["name"], "add")
        self.assertEqual(st["queue"], "jobs")
        self.assertIsNone(st["error"])
        self.assertLessEqual(st["created_at"], st["started_at"])
        self.assertLessEqual(st["started_at"], st["finished_at"])

    def test_handler_sees_its_context_and_kwargs(self):
        tid = self.submit("context", ["x1"], {"k": 1})
        st = self.wait_status(tid, ("SUCCESS",))
        self.assertEqual(st["result"], {"name": "context", "attempt": 1, "id": tid, "x": "x1",
                                        "kw": {"k": 1}})

    def test_progress_is_reported(self):
        tid = self.submit("slow", [12])
        st = wait_until(lambda: (self.status(tid).get("progress") or {}).get("step", 0) >= 2
                        and self.status(tid), 10)
        self.assertTrue(st, self.status(tid))
        self.assertEqual(st["progress"]["of"], 12)
        self.assertIn(st["status"], ("STARTED", "SUCCESS"))
        st = self.wait_status(tid, ("SUCCESS",))
        self.assertEqual(st["result"], "done 12")
        self.assertEqual(st["progress"], {"step": 12, "of": 12})

    def test_failures_are_retried_then_parked(self):
        tid = self.submit("flaky")
        seen = set()

        def failed():
            st = self.status(tid)
            seen.add(st["status"])
            return st["status"] == "FAILURE" and st
        st = wait_until(failed, 20, 0.01)
        self.assertTrue(st, seen)
        self.assertIn("RETRY", seen)
        self.assertEqual(st["attempts"], 3)  # max_retries 2, plus the first
        self.assertEqual(st["error"], "always fails")
        parked = wait_until(lambda: [e for e in self.redis.call(
            "XRANGE", "moonserve:queue:jobs-failed", "-", "+") if tid in e[1]], 5)
        self.assertTrue(parked, "not in the failed-task stream")
        fields = dict(zip(parked[0][1][::2], parked[0][1][1::2]))
        self.assertEqual((fields["name"], fields["error"]), ("flaky", "always fails"))

    def test_unknown_task_name_is_unprocessable(self):
        tid = self.submit("nope", [1])
        st = self.wait_status(tid, ("FAILURE",))
        self.assertIn("unprocessable", st["error"])
        self.assertIn("no task handler 'nope'", st["error"])
        parked = wait_until(lambda: [e for e in self.redis.call(
            "XRANGE", "moonserve:queue:jobs-bad", "-", "+") if tid in e[1]], 5)
        self.assertTrue(parked, "not in the unprocessable stream")

    def test_cancel_stops_a_running_task(self):
        tid = self.submit("slow", [400])
        wait_until(lambda: (self.status(tid).get("progress") or {}).get("step", 0) >= 2, 10)
        r = self.server.request("POST", "/-/tasks/jobs/%s/cancel" % tid)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"task_id": tid, "status": "REVOKED"})
        seen = []

        def still():
            a = self.status(tid)
            seen.append(a)
            return len(seen) > 3 and seen[-1]["progress"] == seen[-4]["progress"]
        self.assertTrue(wait_until(still, 10, 0.1), seen[-4:])
        self.assertEqual(seen[-1]["status"], "REVOKED")
        self.assertLess(seen[-1]["progress"]["step"], 400)
        again = self.server.request("POST", "/-/tasks/jobs/%s/cancel" % tid)
        self.assertEqual(again.status, 409, again)
        self.assertIn("REVOKED", again.json()["error"])

    def test_unknown_ids_and_bad_requests(self):
        self.assertIn("no task", self.status("0123abcd", 404)["error"])
        r = self.server.request("POST", "/-/tasks/jobs/0123abcd/cancel")
        self.assertEqual(r.status, 404, r)
        for body, msg in ((b"not json", "not JSON"), (b"[1]", "JSON object"),
                          (b'{"args": []}', "\"name\""), (b'{"name": "add", "args": 1}', "list"),
                          (b'{"name": "add", "extra": 1}', "unknown field")):
            r = self.server.request("POST", "/-/tasks/jobs", body=body)
            self.assertEqual(r.status, 400, (body, r))
            self.assertIn(msg, r.json()["error"])
            self.assertTrue(r.json()["request_id"])
        r = self.server.get("/-/tasks/nosuchqueue/abc")
        self.assertEqual(r.status, 404, r)
        r = self.server.get("/-/tasks/jobs")
        self.assertEqual(r.status, 405, r)

    def test_deployment_code_submits_and_reads(self):
        tid = self.server.get("/front/submit").json()["id"]
        st = wait_until(lambda: self.server.get("/front/status?id=" + tid).json()["status"]
                        == "SUCCESS" and self.server.get("/front/status?id=" + tid).json(), 20)
        self.assertTrue(st)
        self.assertEqual(st["result"], {"sum": 42})
        bad = self.server.get("/front/bad").json()
        self.assertFalse(bad["ok"])
        self.assertIn("404", bad["err"])

    def test_clients_cannot_send_task_calls(self):
        r = self.server.get("/front/x", headers={"X-Moonserve-Task": "add"})
        self.assertEqual(r.status, 400, r)

    def test_metrics(self):
        tid = self.submit("add", [1, 2])
        self.wait_status(tid, ("SUCCESS",))
        labels = 'application="work",deployment="Worker",queue="jobs"'
        text = self.server.admin_request("GET", "/metrics").text
        samples = {}
        for line in text.splitlines():
            if line.startswith("moonserve_task_queue"):
                k, _, v = line.rpartition(" ")
                samples[k] = float(v)
        self.assertGreaterEqual(
            samples['moonserve_task_queue_tasks_total{%s,outcome="succeeded"}' % labels], 1)
        self.assertGreaterEqual(
            samples['moonserve_task_queue_tasks_total{%s,outcome="submitted"}' % labels], 1)
        self.assertEqual(samples['moonserve_task_queue_connected{%s}' % labels], 1)
        self.assertIn('moonserve_task_queue_backlog{%s}' % labels, samples)
        harness.assert_promtool_accepts(self, text)

    def test_status_shows_the_queue(self):
        dep = self.server.deployment_status("work", "Worker")
        self.assertEqual(dep["task_queue"]["queue"], "jobs")
        self.assertTrue(dep["task_queue"]["connected"])


class ConsumerKilledTest(unittest.TestCase):
    def test_task_runs_again_after_its_replica_is_killed(self):
        redis = start_redis(self)
        srv = harness.start_server(self, apps(redis.url), files={"tasks.lua": TASKS_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        r = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "slow", "args": [40]}')
        tid = r.json()["task_id"]

        def started():
            st = srv.get("/-/tasks/jobs/" + tid).json()
            return (st.get("progress") or {}).get("step", 0) >= 2
        self.assertTrue(wait_until(started, 10))
        pids = [p for p in srv.replica_pids() if "Worker" in " ".join(harness.proc_cmdline(p))]
        self.assertEqual(len(pids), 1, pids)
        os.kill(pids[0], signal.SIGKILL)
        st = wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"] == "SUCCESS"
                        and srv.get("/-/tasks/jobs/" + tid).json(), 30)
        self.assertTrue(st, srv.get("/-/tasks/jobs/" + tid).json())
        self.assertEqual(st["result"], "done 40")
        self.assertGreater(srv.deployment_status("work", "Worker")["task_queue"]["redelivered"],
                           0)


class ShutdownTest(unittest.TestCase):
    def test_a_running_task_finishes_during_the_drain(self):
        redis = start_redis(self)
        srv = harness.start_server(self, apps(redis.url), files={"tasks.lua": TASKS_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        r = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "slow", "args": [20]}')
        tid = r.json()["task_id"]
        self.assertTrue(wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"]
                                   == "STARTED", 10))
        srv.stop(sig=signal.SIGTERM, timeout=30)
        task = dict(zip(*[iter(redis.call("HGETALL", "moonserve:task:" + tid))] * 2))
        self.assertEqual(task["status"], "SUCCESS", task)
        self.assertEqual(json.loads(task["result"]), "done 20")
        self.assertEqual(redis.call("XLEN", "moonserve:queue:jobs"), 0, "not acknowledged")


class RedeployTest(unittest.TestCase):
    def test_a_redeploy_keeps_an_unchanged_queue_and_its_running_tasks(self):
        redis = start_redis(self)
        srv = harness.start_server(self, apps(redis.url), files={"tasks.lua": TASKS_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        r = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "slow", "args": [30]}')
        tid = r.json()["task_id"]
        self.assertTrue(wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"]
                                   == "STARTED", 10))

        def deploy(a):
            cfg = {"http_options": srv.http_options,
                   "admin": {"host": srv.host, "port": srv.admin_port},
                   "control_loop": {"interval_s": 0.05}, "applications": a}
            r = srv.admin_request("PUT", "/api/serve/applications/", body=cfg, timeout=30)
            self.assertEqual(r.status, 200, r)
        changed = apps(redis.url)
        changed[0]["deployments"] = [{"name": "Front", "num_replicas": 2}]  # another deployment
        deploy(changed)
        st = wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"] == "SUCCESS"
                        and srv.get("/-/tasks/jobs/" + tid).json(), 20)
        self.assertTrue(st)
        q = srv.deployment_status("work", "Worker")["task_queue"]
        self.assertEqual((q["started"], q["redelivered"]), (1, 0), q)
        # a changed task_queue block makes a new queue (its counters start again)
        changed[1]["deployments"][0]["task_queue"]["max_retries"] = 5
        deploy(changed)
        self.assertTrue(wait_until(lambda: srv.deployment_status("work", "Worker")
                                   ["task_queue"]["started"] == 0, 10))


class TimeoutTest(unittest.TestCase):
    """request_timeout_s is an HTTP limit: a task runs past it; its queue's task_timeout_s limits
    each attempt instead (a timed-out attempt is a failed one)."""

    def test_request_timeout_does_not_cut_tasks_but_task_timeout_does(self):
        redis = start_redis(self)
        a = apps(redis.url)
        limited = json.loads(json.dumps(a[1]))
        limited["name"] = "limited"
        tq = limited["deployments"][0]["task_queue"]
        tq.update({"queue_name": "short", "task_timeout_s": 0.3, "max_retries": 1,
                   "failed_task_queue_name": None, "unprocessable_task_queue_name": None})
        srv = harness.start_server(self, a + [limited], files={"tasks.lua": TASKS_LUA},
                                   http_options={"request_timeout_s": 0.3},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        long = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "slow", "args": [16]}')
        cut = srv.request("POST", "/-/tasks/short", body=b'{"name": "slow", "args": [16]}')
        tid, cid = long.json()["task_id"], cut.json()["task_id"]
        st = wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"] == "SUCCESS"
                        and srv.get("/-/tasks/jobs/" + tid).json(), 20)
        self.assertTrue(st, srv.get("/-/tasks/jobs/" + tid).json())
        self.assertEqual(st["result"], "done 16")
        self.assertEqual(st["attempts"], 1)
        ct = wait_until(lambda: srv.get("/-/tasks/short/" + cid).json()["status"] == "FAILURE"
                        and srv.get("/-/tasks/short/" + cid).json(), 20)
        self.assertTrue(ct, srv.get("/-/tasks/short/" + cid).json())
        self.assertEqual(ct["attempts"], 2)
        self.assertIn("timed out after 0.3s (task_timeout_s)", ct["error"])


class RedisDownTest(unittest.TestCase):
    def test_redis_down_is_503_and_recovers(self):
        redis = start_redis(self)
        srv = harness.start_server(self, apps(redis.url), files={"tasks.lua": TASKS_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        redis.stop()
        r = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "add", "args": [1, 1]}')
        self.assertEqual(r.status, 503, r)
        self.assertIn("unavailable", r.json()["error"])
        self.assertTrue(r.json()["request_id"])
        self.assertEqual(srv.get("/-/tasks/jobs/abc").status, 503)
        redis.start()

        def submitted():
            r = srv.request("POST", "/-/tasks/jobs", body=b'{"name": "add", "args": [1, 1]}')
            return r.status == 202 and r.json()["task_id"]
        tid = wait_until(submitted, 15, 0.1)
        self.assertTrue(tid, "submits never worked again")
        ok = wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"] == "SUCCESS",
                        20)
        self.assertTrue(ok, srv.get("/-/tasks/jobs/" + tid).json())


class ConfigTest(unittest.TestCase):
    def test_bad_task_queue_is_a_positioned_error(self):
        d = self.enterContext(harness.tempfile.TemporaryDirectory())
        with open(os.path.join(d, "tasks.lua"), "w") as f:
            f.write(TASKS_LUA)
        cfg = os.path.join(d, "c.yaml")
        with open(cfg, "w") as f:
            f.write("applications:\n  - name: work\n    route_prefix: null\n"
                    "    import_path: tasks.lua:worker\n    deployments:\n"
                    "      - name: Worker\n        task_queue:\n"
                    "          broker_url: http://x\n          max_retries: -1\n")
        rc, out = run_cli("check", cfg)
        self.assertNotEqual(rc, 0, out)
        self.assertRegex(out, r"c\.yaml:\d+:\d+: .*broker_url")
        self.assertRegex(out, r"c\.yaml:\d+:\d+: .*max_retries")
        self.assertRegex(out, r"c\.yaml:\d+:\d+: task_queue needs queue_name")


class ScaleFromZeroTest(unittest.TestCase):
    def test_backlog_scales_consumers_from_zero_and_back(self):
        redis = start_redis(self)
        a = apps(redis.url)
        a[1]["deployments"][0]["autoscaling_config"] = {
            "min_replicas": 0, "max_replicas": 2, "initial_replicas": 0,
            "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 0.5,
            "downscale_to_zero_delay_s": 0.5, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5}
        srv = harness.start_server(self, a, files={"tasks.lua": TASKS_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        self.assertEqual(srv.deployment_status("work", "Worker")["target_num_replicas"], 0)
        ids = [srv.request("POST", "/-/tasks/jobs",
                           body=b'{"name": "slow", "args": [6]}').json()["task_id"]
               for _ in range(3)]
        up = srv.wait_status("work", "Worker", lambda d: d.get("target_num_replicas", 0) >= 1,
                             timeout=15, what="a consumer for the backlog")
        self.assertLessEqual(up["target_num_replicas"], 2)
        for tid in ids:
            ok = wait_until(lambda: srv.get("/-/tasks/jobs/" + tid).json()["status"]
                            == "SUCCESS", 30)
            self.assertTrue(ok, srv.get("/-/tasks/jobs/" + tid).json())
        srv.wait_status("work", "Worker", lambda d: d.get("target_num_replicas") == 0,
                        timeout=20, what="back to zero once the queue is empty")


SQUARE_LUA = r'''
local serve = require "moonserve"
local Worker = serve.deployment { name = "Worker", max_ongoing_requests = 4 }
Worker.square = serve.task_handler(function(self, n)
  serve.sleep(0.1 + (n % 5) * 0.02)
  return { n = n, square = n * n, by = serve.get_replica_context().replica_tag }
end)
return { worker = Worker:bind() }
'''


def square_apps(redis_url, replicas=2):
    return [{"name": "work", "route_prefix": None, "import_path": "square.lua:worker",
             "deployments": [{"name": "Worker", "num_replicas": replicas, "task_queue": {
                 "queue_name": "squares", "broker_url": redis_url, "max_retries": 3,
                 "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2,
                 "visibility_timeout_s": 1.5}}]}]


class ManyTasksTest(unittest.TestCase):
    """100 tasks, each checked for its own result, while things go wrong."""

    def submit_all(self, srv, n):
        ids = {}
        for i in range(n):
            r = srv.request("POST", "/-/tasks/squares",
                            body=json.dumps({"name": "square", "args": [i]}).encode())
            self.assertEqual(r.status, 202, r)
            ids[r.json()["task_id"]] = i
        return ids

    def wait_all(self, get, ids, timeout):
        """Every task SUCCESS with its own result; returns {id: status doc}."""
        done = {}

        def all_done():
            for tid in ids:
                if tid in done:
                    continue
                r = get(tid)
                if r.status == 200 and r.json()["status"] == "SUCCESS":
                    done[tid] = r.json()
            return len(done) == len(ids)
        self.assertTrue(wait_until(all_done, timeout, 0.2),
                        "%d of %d tasks ended SUCCESS" % (len(done), len(ids)))
        for tid, st in done.items():
            n = ids[tid]
            self.assertEqual((st["result"]["n"], st["result"]["square"]), (n, n * n), st)
        return done

    def test_consumers_killed_repeatedly(self):
        redis = start_redis(self)
        srv = harness.start_server(self, square_apps(redis.url), files={"square.lua": SQUARE_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        ids = self.submit_all(srv, 100)
        killed = 0

        def succeeded():
            return srv.deployment_status("work", "Worker")["task_queue"]["succeeded"]
        for _ in range(4):  # a consumer replica killed, four times, while the tasks run
            self.assertTrue(wait_until(lambda: len(srv.replica_pids()) == 2, 10))
            self.assertLess(succeeded(), 100, "the tasks ended before the kills")
            pids = srv.replica_pids()
            os.kill(pids[killed % len(pids)], signal.SIGKILL)
            killed += 1
        self.assertEqual(killed, 4)
        self.wait_all(lambda t: srv.get("/-/tasks/squares/" + t), ids, 60)
        self.assertEqual(redis.call("XLEN", "moonserve:queue:squares"), 0)
        self.assertGreater(srv.deployment_status("work", "Worker")["task_queue"]["redelivered"],
                           0, "no kill hit a running task")

    def test_two_engines_share_one_queue(self):
        redis = start_redis(self)
        a = harness.start_server(self, square_apps(redis.url, 1), files={"square.lua": SQUARE_LUA},
                                 extra_config={"control_loop": {"interval_s": 0.05}})
        b = harness.start_server(self, square_apps(redis.url, 1), files={"square.lua": SQUARE_LUA},
                                 extra_config={"control_loop": {"interval_s": 0.05}})
        ids = self.submit_all(a, 100)
        done = self.wait_all(lambda t: b.get("/-/tasks/squares/" + t), ids, 60)
        started = [s.deployment_status("work", "Worker")["task_queue"]["started"] for s in (a, b)]
        self.assertGreater(min(started), 0, "one engine took every task: %r" % started)
        self.assertEqual(len(done), 100)

    def test_a_dead_engines_tasks_are_claimed_by_another(self):
        redis = start_redis(self)
        a = harness.start_server(self, square_apps(redis.url, 2), files={"square.lua": SQUARE_LUA},
                                 extra_config={"control_loop": {"interval_s": 0.05}})
        ids = self.submit_all(a, 30)
        self.assertTrue(wait_until(lambda: a.deployment_status("work", "Worker")["task_queue"]
                                   ["running"] > 0, 10))
        a.kill_all()  # kill -9: the controller and its replicas, tasks held and never acked
        held = redis.call("XPENDING", "moonserve:queue:squares", "moonserve")[0]
        self.assertGreater(held, 0, "the dead engine held no task")
        b = harness.start_server(self, square_apps(redis.url, 2), files={"square.lua": SQUARE_LUA},
                                 extra_config={"control_loop": {"interval_s": 0.05}})
        self.wait_all(lambda t: b.get("/-/tasks/squares/" + t), ids, 60)
        self.assertGreater(b.deployment_status("work", "Worker")["task_queue"]["redelivered"], 0)

    def test_redis_restarted_mid_run(self):
        redis = start_redis(self, durable=True)
        srv = harness.start_server(self, square_apps(redis.url), files={"square.lua": SQUARE_LUA},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        ids = self.submit_all(srv, 100)
        wait_until(lambda: srv.deployment_status("work", "Worker")["task_queue"]["succeeded"]
                   >= 10, 20)
        redis.stop()
        redis.start()
        self.wait_all(lambda t: srv.get("/-/tasks/squares/" + t), ids, 60)


class TranscribeExampleTest(unittest.TestCase):
    """examples/async-transcribe against a test redis-server: submit through its ingress,
    progress, the result; a broken job ends in the dead-letter queue; cancel."""

    def test_example(self):
        from test_examples_run import ExampleServer
        redis = start_redis(self)

        class Server(ExampleServer):
            def _write_config(self):
                super()._write_config()
                with open(self.config_path) as f:
                    text = f.read()
                with open(self.config_path, "w") as f:
                    f.write(text.replace("redis://127.0.0.1:6379/0", redis.url))
        srv = Server("async-transcribe")
        self.addCleanup(srv.cleanup)
        srv.start()
        r = srv.request("POST", "/jobs/transcribe", body=b'{"url": "s3://b/talk.wav"}')
        self.assertEqual(r.status, 202, r)
        tid = r.json()["task_id"]
        prog = wait_until(lambda: (srv.get("/jobs/status/" + tid).json().get("progress")
                                   or {}).get("chunks_done", 0) >= 1, 10)
        self.assertTrue(prog, srv.get("/jobs/status/" + tid).json())
        st = wait_until(lambda: srv.get("/jobs/status/" + tid).json()["status"] == "SUCCESS"
                        and srv.get("/jobs/status/" + tid).json(), 20)
        self.assertTrue(st)
        self.assertEqual(st["result"]["text"], "chunk1 chunk2 chunk3 chunk4 chunk5")
        bad = srv.request("POST", "/jobs/transcribe", body=b'{"url": "s3://b/broken.wav"}')
        bid = bad.json()["task_id"]
        st = wait_until(lambda: srv.get("/jobs/status/" + bid).json()["status"] == "FAILURE"
                        and srv.get("/jobs/status/" + bid).json(), 20)
        self.assertTrue(st)
        self.assertEqual(st["attempts"], 3)
        self.assertIn("cannot read audio", st["error"])
        self.assertTrue(wait_until(lambda: redis.call("XLEN", "moonserve:queue:transcribe-failed")
                                   == 1, 5))
        self.assertEqual(srv.get("/jobs/status/0000").status, 404)
        long = srv.request("POST", "/jobs/transcribe", body=b'{"url": "s3://b/long.wav"}')
        lid = long.json()["task_id"]
        c = srv.request("POST", "/jobs/cancel/" + lid)
        self.assertEqual(c.status, 200, c)
        self.assertEqual(srv.get("/jobs/status/" + lid).json()["status"], "REVOKED")
        srv.stop()


REDIS_TICK = r'''
local M = {}
-- One replica per 3 jobs waiting in a list some other system fills, between 1 and 3; with the
-- list empty, a "floor" key's value (a string) sets the count.
function M.tick(ctx, kwargs)
  local n = ctx.redis.len("jobs:waiting")
  local floor = tonumber(ctx.redis.get("jobs:floor") or "1")
  if n == nil then return nil end
  return { Hello = math.max(floor, math.min(3, math.ceil(n / 3))) }
end
-- A deployment autoscaling policy: as many replicas as the list is long, 1 to 3.
function M.policy(ctx)
  local n = ctx.redis.len("policy:waiting")
  if n == nil then return ctx.target_num_replicas, ctx.policy_state end
  return math.max(1, math.min(3, n)), ctx.policy_state
end
function M.too_many(ctx)
  for i = 1, 70 do ctx.redis.len("k" .. i) end
end
return M
'''


class RedisSignalsTest(unittest.TestCase):
    """An external-scaling tick reads a Redis list's length and a key through ctx.redis, which
    answers at once with what the controller read last; the replica count follows the list."""

    def test_tick_follows_a_redis_list(self):
        redis = start_redis(self)
        app = dict(harness.hello_app("sig", "/sig", {"num_replicas": 1}),
                   external_scaler_enabled=True,
                   external_scaler={"tick": "signals.lua:tick", "tick_interval_s": 0.1,
                                    "redis_url": redis.url})
        srv = harness.start_server(self, [app], files={"signals.lua": REDIS_TICK},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        for i in range(8):
            redis.call("RPUSH", "jobs:waiting", "job%d" % i)
        srv.wait_status("sig", "Hello", lambda d: d.get("target_num_replicas") == 3,
                        timeout=10, what="3 replicas for 8 waiting jobs")
        redis.call("SET", "jobs:floor", "2")
        redis.call("DEL", "jobs:waiting")  # no key reads as length 0
        srv.wait_status("sig", "Hello", lambda d: d.get("target_num_replicas") == 2,
                        timeout=10, what="the floor's 2 replicas once the list is gone")
        redis.call("DEL", "jobs:floor")
        srv.wait_status("sig", "Hello", lambda d: d.get("target_num_replicas") == 1,
                        timeout=10, what="1 replica without a floor")
        status = srv.status()["applications"]["sig"]["external_scaler"]
        self.assertEqual(status["tick"]["failures"], 0, status)

    def test_autoscaling_policy_follows_a_redis_list(self):
        redis = start_redis(self)
        app = harness.hello_app("pol", "/pol", {"autoscaling_config": {
            "min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 0, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5,
            "policy": {"policy_function": "signals.lua:policy", "redis_url": redis.url}}})
        srv = harness.start_server(self, [app], files={"signals.lua": REDIS_TICK},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        redis.call("RPUSH", "policy:waiting", "a", "b")
        srv.wait_status("pol", "Hello", lambda d: d.get("target_num_replicas") == 2, timeout=10,
                        what="2 replicas for a list of 2")
        redis.call("DEL", "policy:waiting")
        srv.wait_status("pol", "Hello", lambda d: d.get("target_num_replicas") == 1, timeout=10,
                        what="back to 1 for an empty list")
        dep = srv.deployment_status("pol", "Hello")
        self.assertEqual(dep["autoscaling"]["policy"]["failures"], 0, dep)

    def test_too_many_keys_is_a_script_error(self):
        redis = start_redis(self)
        app = dict(harness.hello_app("sig2", "/sig2", {"num_replicas": 1}),
                   external_scaler_enabled=True,
                   external_scaler={"tick": "signals.lua:too_many", "tick_interval_s": 0.1,
                                    "redis_url": redis.url})
        srv = harness.start_server(self, [app], files={"signals.lua": REDIS_TICK},
                                   extra_config={"control_loop": {"interval_s": 0.05}})
        st = wait_until(lambda: srv.status()["applications"]["sig2"]["external_scaler"]["tick"]
                        if srv.status()["applications"]["sig2"]["external_scaler"]["tick"]
                        ["failures"] > 0 else None, 10)
        self.assertTrue(st)
        self.assertIn("more than 64 keys", st["last_error"])


if __name__ == "__main__":
    harness.main()
