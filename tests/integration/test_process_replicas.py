"""Process replicas (docs/process-replicas.md): a deployment whose replicas are a user command
speaking HTTP. The engine starts the command where it is told to listen, waits for ready_path,
proxies requests over pooled keep-alive connections (methods, headers, bodies, chunked streams
and SSE passed through), restarts a crashed command, reports a failing start in status, checks
health_path, places it on (fake) GPUs, lets Lua deployments call it through a handle, stops it
gracefully, and leaves nothing running after the engine is killed with SIGKILL."""

import hashlib
import json
import os
import signal
import socket
import sys
import time
import unittest

import harness
from harness import run_cli, wait_until

ECHO_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "procs", "echo_server.py")


def process_app(name="echo", route_prefix="/", replicas=1, env=None, **process):
    proc = {"command": [sys.executable, ECHO_SERVER], "ready_path": "/health"}
    if env:
        proc["env"] = env
    proc.update(process)
    dep = {"name": "Echo", "num_replicas": replicas, "graceful_shutdown_timeout_s": 3,
           "process": proc}
    return {"name": name, "route_prefix": route_prefix, "deployments": [dep]}


def echo(server, path="/echo", method="GET", body=None, headers=None):
    r = server.request(method, path, body=body, headers=headers)
    if r.status != 200:
        raise AssertionError("%s %s -> %r" % (method, path, r))
    return r.json()


class ProcessCase(unittest.TestCase):
    def start(self, *apps, env=None, files=None):
        self.server = harness.Server(list(apps), env=env, files=files)
        self.addCleanup(self.server.cleanup)
        self.server.start()
        return self.server

    def wait_running(self, app, n, timeout=20):
        return self.server.wait_status(app, "Echo", lambda d: len(
            [r for r in d.get("replicas") or [] if r["state"] == "RUNNING"]) == n,
            timeout=timeout, what="%d RUNNING" % n)


class TestPassThrough(ProcessCase):
    def setUp(self):
        self.start(process_app(env={"EXTRA": "yes"}))
        self.wait_running("echo", 1)

    def test_request_reaches_the_command_faithfully(self):
        body = os.urandom(200000)
        got = echo(self.server, "/echo/a%20b?x=1&y=2", "PUT", body,
                   {"X-Custom": "v1", "Content-Type": "application/octet-stream"})
        self.assertEqual(got["method"], "PUT")
        self.assertEqual(got["path"], "/echo/a%20b?x=1&y=2")
        self.assertEqual(got["body_len"], len(body))
        self.assertEqual(got["body_sha256"], hashlib.sha256(body).hexdigest())
        hdrs = {k.lower(): v for k, v in got["headers"]}
        self.assertEqual(hdrs["x-custom"], "v1")
        self.assertEqual(hdrs["content-type"], "application/octet-stream")
        self.assertIn("x-request-id", hdrs)
        self.assertEqual(got["env"]["EXTRA"], "yes")
        self.assertEqual(got["env"]["MOONSERVE_DEPLOYMENT"], "Echo")
        self.assertTrue(got["env"]["MOONSERVE_SOCKET"].endswith(".sock"))
        self.assertEqual(got["cwd"], os.path.realpath(self.server.dir))

    def test_response_headers_and_status_pass_through(self):
        r = self.server.request("GET", "/echo", headers={"X-Request-ID": "rid-process-1"})
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("x-upstream"), "echo")
        cookies = [v for k, v in r.header_list if k.lower() == "set-cookie"]
        self.assertEqual(cookies, ["a=1", "b=2"])
        self.assertEqual(r.header("x-request-id"), "rid-process-1")
        r = self.server.request("GET", "/status/404")
        self.assertEqual((r.status, r.json()), (404, {"status": 404}))
        r = self.server.request("GET", "/status/204")
        self.assertEqual((r.status, r.body), (204, b""))

    def test_chunked_stream_arrives_piece_by_piece(self):
        s = self.server.connect(timeout=10)
        self.addCleanup(s.close)
        s.sendall(b"GET /stream?n=20 HTTP/1.1\r\nHost: x\r\n\r\n")
        reads, data = 0, b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            self.assertTrue(chunk, "connection closed early: %r" % data)
            data += chunk
            reads += 1
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        lines = harness.parse_response_bytes(data).body.decode().splitlines()
        self.assertEqual(lines, ["line %d" % i for i in range(20)])
        self.assertGreater(reads, 3, "the stream came in one piece: it was buffered")

    def test_sse_framing_is_intact(self):
        r = self.server.request("GET", "/sse?n=3")
        self.assertEqual(r.header("content-type"), "text/event-stream")
        self.assertEqual(r.header("cache-control"), "no-cache")
        expected = "".join("id: %d\nevent: tick\ndata: {\"i\": %d}\n\n" % (i, i)
                           for i in range(3)) + ": done\n\n"
        self.assertEqual(r.text, expected)

    def test_keep_alive_connections_are_reused(self):
        # Sequential requests from fresh client connections share one pooled connection to
        # the command: its handler counts the requests it served on its connection.
        counts = [echo(self.server)["conn_requests"] for _ in range(5)]
        self.assertEqual(counts, [1, 2, 3, 4, 5])


def peak_rss_kib(pid):
    """The process's peak resident set (VmHWM), in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for pid %d" % pid)


def read_response_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(4096)
        if not piece:
            raise AssertionError("closed before the head: %r" % data)
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1").lower(), rest


class TestLargeBodies(ProcessCase):
    """Bodies larger than the engine should hold stream through it in both directions, so the
    engine's peak memory stays far below the body's size."""
    MIB = 1 << 20

    def setUp(self):
        self.progress = os.path.join(harness.tempfile.gettempdir(),
                                     "ms-progress-%d-%s" % (os.getpid(), self.id()))
        self.addCleanup(lambda: os.path.exists(self.progress) and os.unlink(self.progress))
        # Under ASan freed blocks wait in a quarantine (256 MB by default) before reuse, which
        # would count every piece that passed through as held: a small one measures retention.
        asan = (os.environ.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=4").lstrip(":")
        self.start(process_app(env={"PROGRESS_FILE": self.progress}),
                   env={"ASAN_OPTIONS": asan})
        self.wait_running("echo", 1)

    def upload(self, body_pieces, headers, total):
        s = self.server.connect(timeout=60)
        self.addCleanup(s.close)
        head = "POST /sink HTTP/1.1\r\nHost: x\r\n" + "".join(
            "%s: %s\r\n" % kv for kv in headers.items()) + "\r\n"
        s.sendall(head.encode())
        digest = hashlib.sha256()
        for piece, raw in body_pieces:
            digest.update(piece)
            s.sendall(raw)
        r = harness.HTTPReader(s).read_response()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["body_len"], total)
        self.assertEqual(r.json()["body_sha256"], digest.hexdigest())
        return r.json()

    def test_100_mib_upload_streams_without_buffering(self):
        before = peak_rss_kib(self.server.pid)
        piece = os.urandom(self.MIB)
        total = 100 * self.MIB
        got = self.upload(((piece, piece) for _ in range(100)),
                          {"Content-Length": str(total)}, total)
        self.assertFalse(got["chunked"])
        grown = peak_rss_kib(self.server.pid) - before
        self.assertLess(grown, 32 * 1024, "engine peak RSS grew %d KiB for a 100 MiB body" % grown)

    def test_chunked_upload_streams_with_its_framing_rewritten(self):
        before = peak_rss_kib(self.server.pid)
        piece = os.urandom(256 * 1024)
        n = 160  # 40 MiB
        raw = b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
        pieces = [(piece, raw)] * n + [(b"", b"0\r\nX-Trailer: t\r\n\r\n")]
        got = self.upload(pieces, {"Transfer-Encoding": "chunked"}, n * len(piece))
        self.assertTrue(got["chunked"])
        grown = peak_rss_kib(self.server.pid) - before
        self.assertLess(grown, 24 * 1024, "engine peak RSS grew %d KiB for a 40 MiB body" % grown)

    def test_small_bodies_still_buffered_and_echoed(self):
        body = os.urandom(1000)
        got = echo(self.server, "/echo", "POST", body)
        self.assertEqual(got["body_sha256"], hashlib.sha256(body).hexdigest())
        hdrs = {k.lower(): v for k, v in got["headers"]}
        self.assertEqual(hdrs["content-length"], "1000")

    def written(self):
        try:
            with open(self.progress) as f:
                return int(f.read() or 0)
        except FileNotFoundError:
            return 0

    def test_content_length_passes_through(self):
        r = self.server.request("GET", "/big?mb=2", timeout=30)
        self.assertEqual(r.status, 200)
        self.assertEqual(r.header("content-length"), str(2 * self.MIB))
        self.assertIsNone(r.header("transfer-encoding"))
        self.assertEqual(r.body, (bytes(range(256)) * 256) * 32)

    def test_slow_reader_holds_back_the_command(self):
        mib = 100
        before = peak_rss_kib(self.server.pid)
        s = self.server.connect(timeout=60)
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /big?mb=%d HTTP/1.1\r\nHost: x\r\n\r\n" % mib)
        # The command starts writing; with nobody reading, it must stall once the socket
        # buffers and the engine's bounded window are full.
        self.assertTrue(wait_until(lambda: self.written() >= self.MIB, 20))
        self.assertTrue(wait_until(lambda: self._steady(self.written()), 20),
                        "the command never stalled: %d bytes written" % self.written())
        held = self.written()
        self.assertLess(held, 32 * self.MIB, "the command wrote %d bytes to a client that "
                                             "reads nothing" % held)
        head, rest = read_response_head(s)
        self.assertIn("content-length: %d" % (mib * self.MIB), head)
        got, digest = len(rest), hashlib.sha256(rest)
        while got < mib * self.MIB:
            piece = s.recv(1 << 20)
            self.assertTrue(piece, "closed after %d bytes" % got)
            digest.update(piece)
            got += len(piece)
        expect = hashlib.sha256((bytes(range(256)) * 256) * (16 * mib)).hexdigest()
        self.assertEqual((got, digest.hexdigest()), (mib * self.MIB, expect))
        grown = peak_rss_kib(self.server.pid) - before
        self.assertLess(grown, 32 * 1024, "engine peak RSS grew %d KiB for a 100 MiB body" % grown)

    def _steady(self, n):
        """True when the command's progress stays at n across a few polls (it is blocked)."""
        for _ in range(10):
            time.sleep(0.05)
            if self.written() != n:
                return False
        return True


class TestBatching(ProcessCase):
    """process.batch: queued requests leave together as one JSON array, split back per caller."""

    def start_batched(self, max_batch_size, wait_s):
        self.log = os.path.join(harness.tempfile.gettempdir(),
                                "ms-batches-%d-%s" % (os.getpid(), self.id()))
        self.addCleanup(lambda: os.path.exists(self.log) and os.unlink(self.log))
        app = process_app(env={"BATCH_LOG_FILE": self.log},
                          batch={"max_batch_size": max_batch_size,
                                 "batch_wait_timeout_s": wait_s})
        app["deployments"][0]["max_ongoing_requests"] = 8
        self.start(app)
        self.wait_running("echo", 1)

    def batches(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]

    def call(self, item):
        return self.server.request("POST", "/anything", body=json.dumps(item).encode(),
                                   headers={"Content-Type": "application/json"}, timeout=20)

    def test_concurrent_requests_leave_as_one_batch(self):
        # A long wait: the batch can only leave because it filled.
        self.start_batched(4, 30)
        out = harness.run_threads(self.call, [({"x": i},) for i in range(4)], 20)
        for i, (r, err) in enumerate(out):
            self.assertIsNone(err)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("content-type"), "application/json")
            self.assertEqual(r.json(), {"y": 2 * i, "batch_size": 4, "header": "4",
                                        "item": {"x": i}})
        self.assertEqual(len(self.batches()), 1)

    def test_a_lone_request_leaves_after_the_wait(self):
        self.start_batched(4, 0.05)
        r = self.call({"x": 21})
        self.assertEqual((r.status, r.json()["y"], r.json()["batch_size"]), (200, 42, 1), r)
        r = self.server.request("POST", "/anything")
        self.assertEqual((r.status, r.json()["item"]), (200, None), r)

    def test_an_answer_that_does_not_split_fails_every_caller(self):
        self.start_batched(2, 30)
        for bad, why in (({"short": True}, "it answered 1 results for 2 requests"),
                         ({"fail": True}, "it answered status 500")):
            out = harness.run_threads(self.call, [({"x": 1},), (bad,)], 20)
            for r, err in out:
                self.assertIsNone(err)
                self.assertEqual(r.status, 502, r)
                self.assertIn("failed a batch of 2: " + why, r.json()["error"])
                self.assertEqual(r.json()["request_id"], r.header("x-request-id"))
        out = harness.run_threads(self.call, [({"x": 5},), ({"x": 6},)], 20)
        self.assertEqual(sorted(r.json()["y"] for r, _ in out), [10, 12])

    def test_a_body_that_is_not_json_is_refused(self):
        self.start_batched(2, 0.01)
        r = self.server.request("POST", "/anything", body=b"{not json")
        self.assertEqual(r.status, 400, r)
        self.assertIn("must be JSON", r.json()["error"])
        self.assertEqual(self.batches(), [])

    def queued(self, n):
        return self.server.wait_status("echo", "Echo", lambda d: d["queued_requests"] == n,
                                       timeout=10, what="%d queued" % n)

    def test_a_caller_that_left_is_not_sent(self):
        self.start_batched(2, 30)
        s = self.server.connect()
        body = json.dumps({"x": 1, "who": "gone"}).encode()
        s.sendall(harness.build_request("POST", "/anything", {"Content-Type": "application/json"},
                                        body))
        self.queued(1)
        s.close()
        self.queued(0)
        out = harness.run_threads(self.call, [({"x": 2},), ({"x": 3},)], 20)
        self.assertEqual(sorted(r.json()["y"] for r, _ in out), [4, 6])
        self.assertEqual([sorted(i["x"] for i in b) for b in self.batches()], [[2, 3]])

    def test_a_caller_leaving_a_running_batch_leaves_the_others_their_answer(self):
        self.start_batched(2, 30)
        release = self.log + ".go"
        self.addCleanup(lambda: os.path.exists(release) and os.unlink(release))
        s = self.server.connect()
        s.sendall(harness.build_request("POST", "/anything", {},
                                        json.dumps({"x": 1}).encode()))
        self.queued(1)
        out = []
        t = harness.threading.Thread(
            target=lambda: out.append(self.call({"x": 2, "wait_for": release})))
        t.start()
        self.assertTrue(wait_until(lambda: len(self.batches()) == 1, 10))
        s.close()
        open(release, "w").close()
        t.join(20)
        self.assertEqual((out[0].status, out[0].json()["y"]), (200, 4), out)
        # The replica's slots were all given back: a full batch still goes.
        out = harness.run_threads(self.call, [({"x": 7},), ({"x": 8},)], 20)
        self.assertEqual(sorted(r.json()["y"] for r, _ in out), [14, 16])


class TestAsForLuaReplicas(ProcessCase):
    """Admission, queues, timeouts, cancellation, scaling to and from zero and metrics treat a
    process deployment as they treat a Lua one."""

    def gate(self, name):
        path = os.path.join(harness.tempfile.gettempdir(),
                            "ms-gate-%d-%s-%s" % (os.getpid(), self.id(), name))
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        return path

    def logged(self, text, timeout=10):
        self.assertTrue(wait_until(lambda: text in self.server.stderr_text(), timeout),
                        "%r not logged:\n%s" % (text, self.server.stderr_tail()))

    def test_max_ongoing_requests_queues_the_rest(self):
        app = process_app()
        app["deployments"][0]["max_ongoing_requests"] = 1
        self.start(app)
        self.wait_running("echo", 1)
        gate = self.gate("a")
        out = []
        t = harness.threading.Thread(target=lambda: out.append(
            self.server.request("GET", "/wait?file=" + gate, timeout=20)))
        t.start()
        self.logged("wait %s: started" % os.path.basename(gate))
        u = harness.threading.Thread(target=lambda: out.append(
            self.server.request("GET", "/echo", timeout=20)))
        u.start()
        self.server.wait_status("echo", "Echo", lambda d: d["queued_requests"] == 1,
                                what="1 queued")
        metrics = self.server.admin_request("GET", "/metrics").body.decode()
        self.assertRegex(metrics, r'moonserve_deployment_queued_requests\{[^}]*deployment="Echo"'
                                  r'[^}]*\} 1\b')
        self.assertRegex(metrics, r'moonserve_deployment_ongoing_requests\{[^}]*deployment='
                                  r'"Echo"[^}]*\} 1\b')
        self.assertEqual(out, [], "the queued request was answered while the first ran")
        open(gate, "w").close()
        t.join(20)
        u.join(20)
        self.assertEqual(sorted(r.status for r in out), [200, 200])

    def test_a_client_that_leaves_closes_the_command_request(self):
        self.start(process_app())
        self.wait_running("echo", 1)
        gate = self.gate("never")
        s = self.server.connect()
        s.sendall(harness.build_request("GET", "/wait?file=" + gate))
        self.logged("wait %s: started" % os.path.basename(gate))
        s.close()
        self.logged("wait %s: client went away" % os.path.basename(gate))
        self.assertEqual(echo(self.server)["method"], "GET")

    def test_request_timeout_answers_408_and_closes_the_command_request(self):
        self.server = harness.Server([process_app()], http_options={"request_timeout_s": 0.5})
        self.addCleanup(self.server.cleanup)
        self.server.start()
        self.wait_running("echo", 1)
        gate = self.gate("never")
        r = self.server.request("GET", "/wait?file=" + gate, timeout=20)
        self.assertEqual(r.status, 408, r)
        self.assertEqual(r.json()["request_id"], r.header("x-request-id"))
        self.logged("wait %s: client went away" % os.path.basename(gate))

    def test_scales_from_zero_and_back_to_zero(self):
        app = process_app(replicas=1)
        dep = app["deployments"][0]
        del dep["num_replicas"]
        dep["autoscaling_config"] = {
            "min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
            "target_ongoing_requests": 1, "upscale_delay_s": 30, "downscale_delay_s": 0.2,
            "downscale_to_zero_delay_s": 0.5, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.3}
        self.server = harness.Server([app], extra_config={"control_loop": {"interval_s": 0.05}})
        self.addCleanup(self.server.cleanup)
        self.server.start()
        self.assertEqual(self.server.deployment_status("echo", "Echo")["target_num_replicas"], 0)
        got = echo(self.server)  # held through the cold start, then served
        self.assertTrue(harness.is_alive(got["pid"]))
        self.server.wait_status("echo", "Echo", lambda d: d["target_num_replicas"] == 0 and not [
            r for r in d.get("replicas") or [] if r["state"] == "RUNNING"], timeout=15,
            what="back to zero")
        self.assertTrue(wait_until(lambda: not harness.is_alive(got["pid"]), 10),
                        "the command outlived its replica")
        self.assertNotEqual(echo(self.server)["pid"], got["pid"])


class TestListenPort(ProcessCase):
    def test_port_mode_and_placeholders(self):
        self.start(process_app(listen="port",
                               command=[sys.executable, ECHO_SERVER, "--id={replica_id}",
                                        "--port={port}"]))
        self.wait_running("echo", 1)
        got = echo(self.server)
        port = int(got["env"]["PORT"])
        self.assertEqual(got["env"]["MOONSERVE_PORT"], str(port))
        self.assertNotIn("MOONSERVE_SOCKET", got["env"])
        rid = got["env"]["MOONSERVE_REPLICA_ID"]
        with open("/proc/%d/cmdline" % got["pid"], "rb") as f:
            argv = f.read().split(b"\0")
        self.assertIn(("--id=%s" % rid).encode(), argv)
        self.assertIn(("--port=%d" % port).encode(), argv)


class TestLifecycle(ProcessCase):
    def test_crash_is_restarted(self):
        self.start(process_app())
        self.wait_running("echo", 1)
        first = echo(self.server)["pid"]
        os.kill(first, signal.SIGKILL)
        got = wait_until(lambda: (lambda r: r.status == 200 and r.json()["pid"] != first and r)(
            self.server.request("GET", "/echo")), 20, 0.1)
        self.assertTrue(got, "no new replica answered; stderr:\n" + self.server.stderr_tail())
        self.assertIn("Echo#", self.server.stderr_text())

    def test_output_is_logged_with_the_replica_id(self):
        self.start(process_app())
        self.wait_running("echo", 1)
        rid = echo(self.server)["env"]["MOONSERVE_REPLICA_ID"]
        self.assertTrue(wait_until(lambda: "replica Echo#%s: echo server %s listening" % (rid, rid)
                                   in self.server.stderr_text(), 5))

    def test_command_that_exits_at_start_fails_the_deployment(self):
        self.start(process_app(env={"EXIT_AT_START": "3"}))
        dep = self.server.wait_status("echo", "Echo", lambda d: d["status"] == "DEPLOY_FAILED",
                                      timeout=30, what="DEPLOY_FAILED")
        self.assertIn("exited with status 3 before it was ready", dep["message"])
        self.assertIn("exiting at start as asked", dep["message"])
        r = self.server.request("GET", "/echo")
        self.assertEqual(r.status, 503)

    def test_not_ready_in_time_fails_with_the_reason(self):
        self.start(process_app(env={"READY_DELAY_S": "30"}, ready_timeout_s=0.5))
        dep = self.server.wait_status("echo", "Echo", lambda d: d["status"] == "DEPLOY_FAILED",
                                      timeout=30, what="DEPLOY_FAILED")
        self.assertIn("not ready within ready_timeout_s (0.5s): GET /health", dep["message"])

    def test_failing_health_path_replaces_the_replica(self):
        flag = os.path.join(harness.tempfile.gettempdir(), "ms-health-%d" % os.getpid())
        self.addCleanup(lambda: os.path.exists(flag) and os.unlink(flag))
        app = process_app(env={"FAIL_HEALTH_FILE": flag}, health_path="/health")
        app["deployments"][0].update(health_check_period_s=0.2, health_check_timeout_s=1)
        self.start(app)
        self.wait_running("echo", 1)
        first = echo(self.server)["pid"]
        open(flag, "w").close()
        self.assertTrue(wait_until(lambda: "unhealthy after 3 failed health checks"
                                   in self.server.stderr_text(), 15), self.server.stderr_tail())
        os.unlink(flag)
        got = wait_until(lambda: (lambda r: r.status == 200 and r.json()["pid"] != first)(
            self.server.request("GET", "/echo")), 20, 0.1)
        self.assertTrue(got)

    def test_graceful_stop_and_nothing_left(self):
        self.start(process_app(replicas=2))
        self.wait_running("echo", 2)
        pids = {echo(self.server)["pid"] for _ in range(6)}
        self.server.stop()
        for pid in pids:
            self.assertTrue(wait_until(lambda: not os.path.exists("/proc/%d" % pid), 5))

    def test_no_orphan_after_the_engine_is_killed(self):
        self.start(process_app(replicas=2))
        self.wait_running("echo", 2)
        dep = self.server.deployment_status("echo", "Echo")
        shims = [r["pid"] for r in dep["replicas"]]
        commands = set()
        for _ in range(20):
            commands.add(echo(self.server)["pid"])
            if len(commands) == 2:
                break
        self.assertEqual(len(commands), 2)
        os.kill(self.server.pid, signal.SIGKILL)
        self.server.proc.wait(5)
        for pid in shims + list(commands):
            self.assertTrue(wait_until(lambda: not harness.is_alive(pid), 10),
                            "pid %d outlived the engine" % pid)


class TestPlacementAndComposition(ProcessCase):
    def test_cuda_visible_devices_in_fake_gpu_mode(self):
        app = process_app(replicas=2)
        app["deployments"][0]["ray_actor_options"] = {"num_gpus": 1}
        self.start(app, env={"MOONSERVE_FAKE_GPUS": "A100:16384,A100:16384"})
        self.wait_running("echo", 2)
        seen = set()
        for _ in range(30):
            seen.add(echo(self.server)["env"].get("CUDA_VISIBLE_DEVICES"))
            if len(seen) == 2:
                break
        self.assertEqual(seen, {"0", "1"})

    def test_called_from_lua_through_a_handle(self):
        lua = r'''
local serve = require "moonserve"
local Model = serve.deployment { name = "Model", process = {
  command = { PYTHON, SERVER }, ready_path = "/health" } }
local Ingress = serve.deployment { name = "Ingress" }
function Ingress:init(model) self.model = model end
function Ingress:__call(req)
  local out = self.model:remote(req):result()
  return { via = "lua", model = out }
end
return { app = Ingress:bind(Model:bind()) }
'''
        lua = lua.replace("PYTHON", json.dumps(sys.executable)).replace(
            "SERVER", json.dumps(ECHO_SERVER))
        self.start({"name": "comp", "route_prefix": "/", "import_path": "comp.lua:app"},
                   files={"comp.lua": lua})
        self.server.wait_status("comp", "Model", lambda d: d["status"] == "HEALTHY", timeout=20)
        r = self.server.request("POST", "/echo/x", body=b"payload")
        self.assertEqual(r.status, 200, r)
        got = r.json()
        self.assertEqual(got["via"], "lua")
        self.assertEqual(got["model"]["body_len"], 7)
        self.assertEqual(got["model"]["env"]["MOONSERVE_DEPLOYMENT"], "Model")


class TestConfigErrors(unittest.TestCase):
    def check(self, process, expect):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.yaml")
            app = {"name": "a", "deployments": [{"name": "P", "process": process}]}
            with open(path, "w") as f:
                f.write(harness.to_yaml({"applications": [app]}))
            rc, out = run_cli("check", path)
            self.assertEqual(rc, 1, out)
            self.assertRegex(out, r"c\.yaml:\d+:\d+: .*" + expect)

    def test_errors_name_the_problem(self):
        self.check({"ready_path": "/"}, "process is missing required key 'command'")
        self.check({"command": []}, "command must be a non-empty list")
        self.check({"command": ["no-such-program-xyz"]}, "program 'no-such-program-xyz' not "
                                                         "found in PATH")
        self.check({"command": ["true"], "ready_pth": "/"}, "did you mean 'ready_path'")
        self.check({"command": ["true"], "ready_path": "health"}, "ready_path must be a path")
        self.check({"command": ["true"], "listen": "tcp"}, "listen must be")
        self.check({"command": ["true"], "cwd": "/no/such/dir"}, "cwd: /no/such/dir is not a "
                                                                 "folder")
        self.check({"command": ["true"], "batch": 5}, "batch must be a mapping")
        self.check({"command": ["true"], "batch": {"max_batch_size": 0}},
                   "max_batch_size must be an integer from 1")
        self.check({"command": ["true"], "batch": {"max_batch_sise": 2}},
                   "did you mean 'max_batch_size'")
        self.check({"command": ["true"], "batch": {"path": "batch"}}, "path must be a path")
        self.check({"command": ["true"], "stream_body_bytes": -1}, "stream_body_bytes must be")

    def test_check_warns_about_a_batch_that_cannot_fill(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.yaml")
            for ongoing, warned in ((3, True), (4, False)):
                with open(path, "w") as f:
                    f.write(harness.to_yaml({"applications": [{"name": "a", "deployments": [
                        {"name": "P", "max_ongoing_requests": ongoing,
                         "process": {"command": ["true"], "batch": {"max_batch_size": 4}}}]}]}))
                rc, out = run_cli("check", path)
                self.assertEqual(rc, 0, out)
                self.assertEqual("max_ongoing_requests (3) is less than "
                                 "process.batch.max_batch_size (4): its batches can never fill"
                                 in out, warned, out)

    def test_config_only_application_needs_a_process(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.yaml")
            with open(path, "w") as f:
                f.write(harness.to_yaml({"applications": [
                    {"name": "a", "deployments": [{"name": "P", "num_replicas": 1}]}]}))
            rc, out = run_cli("check", path)
            self.assertEqual(rc, 1, out)
            self.assertIn("without code must consist of one deployment with a 'process' block",
                          out)
            with open(path, "w") as f:
                f.write(harness.to_yaml({"applications": [
                    {"name": "a", "deployments": [{"name": "P", "process": {"command": ["true"]}}]}]}))
            rc, out = run_cli("check", path)
            self.assertEqual(rc, 0, out)


if __name__ == "__main__":
    harness.main()
