"""Graceful shutdown: SIGTERM/SIGINT drain in-flight requests, refuse new ones, exit 0 within
graceful_shutdown_timeout_s, leave no replica processes; a SIGKILLed controller leaves no
orphans either."""

import errno
import os
import shutil
import signal
import socket
import threading
import time
import unittest

import harness
from harness import (HTTPReader, build_request, hello_app, is_alive, read_until_closed,
                     start_server, wait_until)


def new_connection_outcome(server, timeout=1.5):
    """What a brand-new client gets now: 'refused', 'closed', 'timeout', or a status code."""
    try:
        s = socket.create_connection((server.host, server.port), timeout=timeout)
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return "refused"
        return "oserror:%s" % e
    try:
        s.settimeout(timeout)
        try:
            s.sendall(build_request("GET", "/hello/new"))
            return HTTPReader(s).read_response().status
        except (harness.ConnectionClosed, ConnectionResetError, BrokenPipeError):
            return "closed"
        except socket.timeout:
            return "timeout"
    finally:
        s.close()


class ShutdownTest(unittest.TestCase):

    def start(self, deployment=None, **kw):
        d = {"num_replicas": 2, "graceful_shutdown_timeout_s": 5,
             "graceful_shutdown_wait_loop_s": 0.2}
        d.update(deployment or {})
        return start_server(self, [hello_app("hello", "/hello", d)], **kw)

    def in_background(self, fn):
        out = {}

        def run():
            t0 = time.monotonic()
            try:
                out["result"] = fn()
            except Exception as e:  # noqa
                out["error"] = e
            out["dt"] = time.monotonic() - t0

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t, out

    def test_sigterm_drains_in_flight(self):
        srv = self.start()
        srv.wait_replicas(2)
        srv.snapshot_children()
        t, out = self.in_background(lambda: srv.get("/hello/drain?sleep=1",
                                                     headers={"X-Request-ID": "drain-1"},
                                                     timeout=10))
        time.sleep(0.2)
        t_term = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        # new connections are refused (or at least not served) soon after SIGTERM
        outcome = None
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            time.sleep(0.1)
            outcome = new_connection_outcome(srv)
            if outcome in ("refused", "closed", 503):
                break
        self.assertIn(outcome, ("refused", "closed", 503),
                      "a new client after SIGTERM got %r" % (outcome,))
        t.join(10)
        self.assertIn("result", out, "in-flight request failed during drain: %r" % out)
        r = out["result"]
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-request-id"), "drain-1")
        self.assertGreater(out["dt"], 0.9)
        rc = srv.wait_exit(7)
        self.assertIsNotNone(rc, "did not exit within graceful_shutdown_timeout_s (5s) + 2s")
        self.assertLess(time.monotonic() - t_term, 7)
        problems = srv.stop(check=False)  # exit code, leftovers, sanitizers
        self.assertEqual(problems, [])

    def test_sigterm_lets_stream_finish(self):
        srv = self.start()
        srv.wait_replicas(2)
        s = srv.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/stream?n=5&gap=0.2"))
            time.sleep(0.3)
            srv.send_signal(signal.SIGTERM)
            data, closed = read_until_closed(s, 8)
        finally:
            s.close()
        r = harness.parse_response_bytes(data)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.chunked)
        self.assertEqual(r.body, b"part-1;part-2;part-3;part-4;part-5;")
        self.assertIsNotNone(srv.wait_exit(7))
        self.assertEqual(srv.stop(check=False), [])

    def test_sigterm_completes_queued_requests(self):
        # one slot, three requests: one running, two queued when SIGTERM arrives; all are
        # answered (the queue drains within graceful_shutdown_timeout_s)
        srv = self.start(deployment={"num_replicas": 1, "max_ongoing_requests": 1})
        srv.wait_replicas(1)
        threads = [self.in_background(lambda i=i: srv.get("/hello/q%d?sleep=0.4" % i,
                                                           timeout=10))
                   for i in range(3)]
        time.sleep(0.2)
        srv.send_signal(signal.SIGTERM)
        for t, _ in threads:
            t.join(10)
        outs = [o for _, o in threads]
        self.assertTrue(all("result" in o for o in outs), outs)
        statuses = sorted(o["result"].status for o in outs)
        self.assertEqual(statuses, [200, 200, 200], outs)
        self.assertIsNotNone(srv.wait_exit(7))
        self.assertEqual(srv.stop(check=False), [])

    def test_healthz_503_while_draining(self):
        # a pipelined /-/healthz behind a slow request is answered during the drain: 503
        srv = self.start()
        srv.wait_replicas(2)
        s = srv.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/slow?sleep=1") +
                      build_request("GET", "/-/healthz"))
            time.sleep(0.3)
            srv.send_signal(signal.SIGTERM)
            rd = HTTPReader(s)
            first = rd.read_response()
            try:
                second = rd.read_response()
            except harness.ConnectionClosed:
                second = None
        finally:
            s.close()
        self.assertEqual(first.status, 200, first)
        if second is None:
            # closing instead is fine if the last response said so (RFC 9112 9.6), so the
            # client knows the pipelined request was not processed
            self.assertEqual(first.header("connection", "").lower(), "close",
                             "connection closed under a pipelined request without "
                             "'Connection: close' on the last response: %r" % first)
        else:
            # docs/operations.md: /-/healthz answers 503 on connections open while draining
            self.assertEqual(second.status, 503, second)
        self.assertIsNotNone(srv.wait_exit(7))
        self.assertEqual(srv.stop(check=False), [])

    def test_healthz_503_on_connection_open_at_sigterm(self):
        # a client half-way through its request head when SIGTERM arrives finishes it: 503
        srv = self.start()
        srv.wait_replicas(2)
        t, out = self.in_background(lambda: srv.get("/hello/x?sleep=1.5", timeout=10))
        c = srv.connect()
        try:
            c.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.3)
            srv.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            c.sendall(b"\r\n")
            data, _closed = read_until_closed(c, 3)
        finally:
            c.close()
        self.assertTrue(data, "no answer to /-/healthz during the drain")
        self.assertEqual(harness.parse_response_bytes(data).status, 503, data)
        t.join(10)
        self.assertEqual(out["result"].status, 200, out)
        self.assertIsNotNone(srv.wait_exit(7))
        self.assertEqual(srv.stop(check=False), [])

    def test_repeated_sigterm_still_drains(self):
        srv = self.start()
        srv.wait_replicas(2)
        t, out = self.in_background(lambda: srv.get("/hello/drain?sleep=1", timeout=10))
        time.sleep(0.2)
        for _ in range(3):
            srv.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        t.join(10)
        self.assertIn("result", out, out)
        self.assertEqual(out["result"].status, 200, out["result"])
        self.assertIsNotNone(srv.wait_exit(7))
        self.assertEqual(srv.stop(check=False), [])

    def test_second_sigint_skips_wait(self):
        srv = self.start(deployment={"graceful_shutdown_timeout_s": 20})
        srv.wait_replicas(2)
        t, out = self.in_background(lambda: srv.get("/hello/long?sleep=30", timeout=20))
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.send_signal(signal.SIGINT)
        time.sleep(0.2)
        srv.send_signal(signal.SIGINT)
        rc = srv.wait_exit(10)
        dt = time.monotonic() - t0
        self.assertIsNotNone(rc, "second SIGINT did not cut the 20 s drain short (10 s later)")
        self.assertLess(dt, 8.0)
        t.join(5)
        self.assertFalse(t.is_alive())
        self.assertEqual(srv.stop(check=False), [])

    def port_open(self, srv):
        try:
            socket.create_connection((srv.host, srv.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def test_sigterm_right_after_ingress_opens(self):
        # once the ingress listens, SIGTERM must take the graceful path (exit 0), even while
        # the replicas are still starting
        for attempt in range(3):
            with self.subTest(attempt=attempt):
                srv = harness.Server([hello_app("hello", "/hello", {"num_replicas": 3})])
                self.addCleanup(srv.cleanup)
                srv.start(wait=False)
                opened = wait_until(lambda: (srv.snapshot_children() or True) and
                                    self.port_open(srv), 15, 0.005)
                self.assertTrue(opened, "ingress never opened")
                srv.stop(timeout=8)

    def test_sigterm_while_replicas_start(self):
        srv = harness.Server([hello_app("hello", "/hello", {"num_replicas": 3})])
        self.addCleanup(srv.cleanup)
        srv.start(wait=False)
        self.assertTrue(wait_until(lambda: self.port_open(srv), 15, 0.01))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            srv.snapshot_children()
            time.sleep(0.01)
        srv.stop(timeout=8)

    def test_sigint_exits_zero(self):
        srv = self.start()
        srv.wait_replicas(2)
        self.assertEqual(srv.get("/hello/x").status, 200)
        srv.stop(sig=signal.SIGINT, timeout=8)

    def test_idle_connections_do_not_delay_exit(self):
        srv = self.start(deployment={"graceful_shutdown_timeout_s": 10})
        s = srv.connect()
        try:
            s.sendall(build_request("GET", "/hello/ka"))
            self.assertEqual(HTTPReader(s).read_response().status, 200)
            t0 = time.monotonic()
            srv.stop(timeout=8)
            self.assertLess(time.monotonic() - t0, 4.0, "an idle keep-alive connection "
                                                         "held up shutdown")
            # the idle connection was closed by the server
            _data, closed = read_until_closed(s, 1)
            self.assertTrue(closed)
        finally:
            s.close()

    def test_shutdown_bounded_by_graceful_timeout(self):
        srv = self.start(deployment={"graceful_shutdown_timeout_s": 1.5})
        srv.wait_replicas(2)
        t, out = self.in_background(lambda: srv.get("/hello/long?sleep=30", timeout=20))
        time.sleep(0.3)
        t0 = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        rc = srv.wait_exit(8)
        dt = time.monotonic() - t0
        self.assertIsNotNone(rc, "a 30 s request kept the server alive past "
                                 "graceful_shutdown_timeout_s=1.5 (+6.5 s)")
        self.assertLess(dt, 6.0)
        t.join(5)
        self.assertFalse(t.is_alive(), "client of the cut request hung")
        # the cut request is answered with an error or its connection closed, never a 200
        if "result" in out:
            self.assertNotEqual(out["result"].status, 200, out["result"])
        srv.stop(timeout=1)

    def test_controller_sigkill_leaves_no_orphans(self):
        srv = self.start()
        pids = srv.wait_replicas(2)
        for d in srv.run_dirs():  # a SIGKILLed controller cannot remove its run folder
            self.addCleanup(shutil.rmtree, d, True)
        kids = list(srv.known_children)
        srv.send_signal(signal.SIGKILL)
        self.assertIsNotNone(srv.wait_exit(5))
        wait_until(lambda: not [p for p, st in kids if is_alive(p, st)], 5)
        survivors = [p for p, st in kids if is_alive(p, st)]
        for p, st in kids:  # clean up by pid before failing
            if is_alive(p, st):
                os.kill(p, signal.SIGKILL)
        self.assertEqual(survivors, [], "replicas survived their controller's SIGKILL")
        self.assertTrue(pids)
        srv.stopped = True  # exit code is -9 by construction; leftovers checked above
        self.assertEqual(srv.check_sanitizers(), [])


if __name__ == "__main__":
    harness.main()
