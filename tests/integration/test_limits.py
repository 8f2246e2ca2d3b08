"""Limits and admission: 413, 431, header timeout (slowloris), idle keep-alive timeout, 408
request timeout, 503 on max_queued_requests overflow, the max_ongoing_requests cap."""

import socket
import threading
import time

import harness
from harness import (HTTPReader, build_request, hello_app, parse_response_bytes,
                     read_until_closed, run_threads)


def timed_get(server, path, timeout=15.0):
    t0 = time.monotonic()
    r = server.get(path, timeout=timeout)
    return r, time.monotonic() - t0


class LimitsTest(harness.ServerTestCase):
    HTTP_OPTIONS = {
        "max_header_bytes": 2048,
        "max_body_bytes": 1000,
        "header_timeout_s": 1.0,
        "keep_alive_timeout_s": 1.5,
    }
    APPLICATIONS = [
        hello_app("hello", "/hello", {"num_replicas": 1}),
        {"name": "echo", "route_prefix": "/echo", "import_path": "echo.lua:app"},
        # admission: one slot, one queue place
        hello_app("queue", "/queue", {"num_replicas": 1, "max_ongoing_requests": 1,
                                      "max_queued_requests": 1}),
        # concurrency cap: 2 at a time on a single replica
        hello_app("cap", "/cap", {"num_replicas": 1, "max_ongoing_requests": 2}),
    ]

    # -- body and header limits -----------------------------------------------------------------

    def test_body_at_limit_ok(self):
        body = b"x" * 1000
        r = self.server.request("POST", "/echo", body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, body)

    def test_413_content_length(self):
        s = self.server.connect()
        try:
            s.sendall(build_request("POST", "/echo", body=b"y" * 1001,
                                    headers={"X-Request-ID": "big-1"}))
            r = HTTPReader(s).read_response()
        finally:
            s.close()
        body = self.assertErrorJSON(r, 413)
        self.assertEqual(body["request_id"], "big-1")

    def test_413_announced_before_body_sent(self):
        # a huge Content-Length is refused without waiting for the body to arrive
        s = self.server.connect()
        try:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            data, _closed = read_until_closed(s, 3)
        finally:
            s.close()
        self.assertTrue(data, "no answer to an oversized Content-Length within 3s")
        self.assertErrorJSON(parse_response_bytes(data), 413)

    def test_413_chunked(self):
        chunk = b"z" * 400
        raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
               (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3 + b"0\r\n\r\n")
        s = self.server.connect()
        try:
            s.sendall(raw)
            data, _closed = read_until_closed(s, 3)
        finally:
            s.close()
        self.assertTrue(data, "no answer to an oversized chunked body")
        self.assertErrorJSON(parse_response_bytes(data), 413)

    def test_431_headers_too_large(self):
        hdrs = {"X-Filler-%d" % i: "v" * 100 for i in range(30)}  # ~3.5 KB > 2048
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/hello/x", headers=hdrs))
            data, _closed = read_until_closed(s, 3)
        finally:
            s.close()
        self.assertTrue(data, "no answer to oversized headers")
        self.assertErrorJSON(parse_response_bytes(data), 431)

    def test_431_long_request_line(self):
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/hello/" + "a" * 4000))
            data, _closed = read_until_closed(s, 3)
        finally:
            s.close()
        self.assertTrue(data, "no answer to an oversized request line")
        r = parse_response_bytes(data)
        self.assertIn(r.status, (414, 431), r)
        self.assertErrorJSON(r, r.status)

    def test_headers_under_limit_ok(self):
        hdrs = {"X-Filler-%d" % i: "v" * 100 for i in range(10)}  # ~1.2 KB
        r = self.server.get("/hello/x", headers=hdrs)
        self.assertEqual(r.status, 200, r)

    def test_server_healthy_after_limits(self):
        self.test_413_content_length()
        self.test_431_headers_too_large()
        self.assertEqual(self.server.get("/hello/after").status, 200)

    # -- timeouts -------------------------------------------------------------------------------

    def test_slowloris_cut_off_others_served(self):
        s = self.server.connect()
        stop = threading.Event()
        normal = []

        def normal_client():
            while not stop.is_set():
                try:
                    r, dt = timed_get(self.server, "/hello/normal", timeout=3)
                    normal.append((r.status, dt))
                except Exception as e:  # noqa
                    normal.append((repr(e), 0))
                time.sleep(0.05)

        t = threading.Thread(target=normal_client, daemon=True)
        t.start()
        t0 = time.monotonic()
        cut_at = None
        try:
            payload = b"GET /hello/slow HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            for i in range(len(payload)):
                try:
                    s.sendall(payload[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    cut_at = time.monotonic() - t0
                    break
                # the server may have answered (e.g. 408) and closed: check without blocking
                s.settimeout(0.25)
                try:
                    got = s.recv(4096)
                    # EOF, or an answer (e.g. 408) before the head was complete: cut off
                    cut_at = time.monotonic() - t0
                    if got:
                        read_until_closed(s, 2)  # bounded drain until close
                    break
                except socket.timeout:
                    pass
                except ConnectionResetError:
                    cut_at = time.monotonic() - t0
                    break
                if time.monotonic() - t0 > 6:
                    break
        finally:
            stop.set()
            t.join(5)
            s.close()
        self.assertIsNotNone(cut_at, "slowloris connection still open after 6s "
                                     "(header_timeout_s=1)")
        self.assertLess(cut_at, 4.0)
        self.assertGreater(cut_at, 0.5, "cut off before header_timeout_s")
        self.assertTrue(normal, "normal client made no requests")
        bad = [x for x in normal if x[0] != 200]
        self.assertFalse(bad, "normal client affected by slowloris: %r" % bad)
        self.assertGreaterEqual(len(normal), 3, normal)

    def test_silent_connection_closed(self):
        # a connection that never sends a byte is closed after header_timeout_s (1 s)
        s = self.server.connect()
        try:
            t0 = time.monotonic()
            data, closed = read_until_closed(s, 5)
            dt = time.monotonic() - t0
        finally:
            s.close()
        self.assertTrue(closed, "silent connection still open after 5s")
        self.assertLess(dt, 3.5)

    def test_many_slow_clients(self):
        socks = []
        try:
            for i in range(100):
                s = self.server.connect()
                s.sendall(b"GET /hello/slow%d HTTP/1.1\r\nHost: x\r\n" % i)
                socks.append(s)
            t0 = time.monotonic()
            r = self.server.get("/hello/normal", timeout=3)
            self.assertEqual(r.status, 200, r)
            self.assertLess(time.monotonic() - t0, 1.0)
            closed = 0
            for s in socks:
                _data, c = read_until_closed(s, max(0.1, 4 - (time.monotonic() - t0)))
                closed += c
            self.assertEqual(closed, len(socks), "slow clients not all cut off")
        finally:
            for s in socks:
                s.close()
        self.assertEqual(self.server.get("/hello/after").status, 200)

    def test_idle_keep_alive_closed(self):
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/hello/idle"))
            r = HTTPReader(s).read_response()
            self.assertEqual(r.status, 200, r)
            t0 = time.monotonic()
            data, closed = read_until_closed(s, 5)
            dt = time.monotonic() - t0
        finally:
            s.close()
        self.assertTrue(closed, "idle keep-alive connection not closed after 5s "
                                "(keep_alive_timeout_s=1.5)")
        self.assertEqual(data, b"")
        self.assertGreater(dt, 0.8, "idle connection closed too early")

    def test_active_keep_alive_not_cut(self):
        # a connection making a request every 0.5 s outlives keep_alive_timeout_s (1.5 s)
        s = self.server.connect()
        try:
            rd = HTTPReader(s)
            for i in range(6):
                s.sendall(build_request("GET", "/hello/busy%d" % i))
                self.assertEqual(rd.read_response().status, 200)
                time.sleep(0.5)
        finally:
            s.close()

    def test_slow_body_cut_off_or_answered(self):
        # headers complete, body never arrives: the connection must not be held forever
        s = self.server.connect()
        try:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            data, closed = read_until_closed(s, 8)
        finally:
            s.close()
        self.assertTrue(closed, "connection with a stalled body still open after 8s")

    # -- admission ------------------------------------------------------------------------------

    def test_503_when_queue_full(self):
        # warm up so the replica is surely up
        self.assertEqual(self.server.get("/queue/warm").status, 200)

        def one(i):
            time.sleep(0.1 * i)  # stagger so the first holds the slot, the second queues
            r, dt = timed_get(self.server, "/queue/q%d?sleep=1" % i, timeout=10)
            return r, dt

        res = run_threads(one, [(i,) for i in range(3)], timeout=15)
        errs = [e for _, e in res if e]
        self.assertFalse(errs, errs)
        statuses = [r.status for (r, _), _ in res]
        self.assertIn(503, statuses, statuses)
        self.assertIn(200, statuses, statuses)
        for (r, dt), _ in res:
            if r.status == 503:
                self.assertLess(dt, 0.8, "503 was not immediate (%.2fs)" % dt)
                self.assertErrorJSON(r, 503)
            else:
                self.assertEqual(r.status, 200, r)
        self.assertEqual(self.server.get("/queue/after").status, 200)

    def test_max_ongoing_requests_cap(self):
        self.assertEqual(self.server.get("/cap/warm").status, 200)
        t0 = time.monotonic()
        res = run_threads(lambda i: self.server.get("/cap/c%d?sleep=0.5" % i, timeout=20),
                          [(i,) for i in range(6)], timeout=25)
        total = time.monotonic() - t0
        errs = [e for _, e in res if e]
        self.assertFalse(errs, errs)
        self.assertEqual([r.status for r, _ in res], [200] * 6, [r for r, _ in res])
        # 6 requests, 2 at a time, 0.5 s each: at least 3 rounds
        self.assertGreaterEqual(total, 1.4, "6 x 0.5s requests with max_ongoing_requests=2 "
                                            "finished in %.2fs: the cap was not respected" % total)

    def test_yielding_handler_serves_concurrently(self):
        # the converse: 2 requests within the cap of 2 run together (serve.sleep yields)
        self.assertEqual(self.server.get("/cap/warm").status, 200)
        t0 = time.monotonic()
        res = run_threads(lambda i: self.server.get("/cap/y%d?sleep=0.6" % i, timeout=20),
                          [(i,) for i in range(2)], timeout=25)
        total = time.monotonic() - t0
        self.assertEqual([r.status for r, _ in res if r], [200, 200], res)
        self.assertLess(total, 1.15, "two yielding requests did not overlap (%.2fs)" % total)


class RequestTimeoutTest(harness.ServerTestCase):
    HTTP_OPTIONS = {"request_timeout_s": 1.0}
    APPLICATIONS = [hello_app("hello", "/hello", {"num_replicas": 1,
                                                  "max_ongoing_requests": 4}),
                    hello_app("single", "/single", {"num_replicas": 1,
                                                    "max_ongoing_requests": 1})]

    def test_408_while_still_queued(self):
        # one slot: the second request waits in the queue and must time out there, not hang
        self.assertEqual(self.server.get("/single/warm").status, 200)
        res = {}

        def hold():
            res["hold"] = self.server.get("/single/hold?sleep=3", timeout=10)

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        time.sleep(0.15)
        t0 = time.monotonic()
        r = self.server.get("/single/queued?sleep=3", headers={"X-Request-ID": "q-408"},
                            timeout=10)
        dt = time.monotonic() - t0
        t.join(10)
        body = self.assertErrorJSON(r, 408)
        self.assertEqual(body["request_id"], "q-408")
        self.assertGreater(dt, 0.8)
        self.assertLess(dt, 2.5)
        self.assertIn("hold", res)
        self.assertErrorJSON(res["hold"], 408)
        self.assertEqual(self.server.get("/single/after", timeout=5).status, 200)

    def test_408_when_handler_too_slow(self):
        t0 = time.monotonic()
        r = self.server.get("/hello/slow?sleep=4", headers={"X-Request-ID": "slow-408"},
                            timeout=10)
        dt = time.monotonic() - t0
        body = self.assertErrorJSON(r, 408)
        self.assertEqual(body["request_id"], "slow-408")
        self.assertGreater(dt, 0.8)
        self.assertLess(dt, 3.0, "408 came only after %.2fs (request_timeout_s=1)" % dt)

    def test_timeout_after_stream_started_cuts_stream(self):
        # once the head went out, request_timeout_s cuts the stream: no 408, no final chunk
        s = self.server.connect(timeout=10)
        try:
            t0 = time.monotonic()
            s.sendall(build_request("GET", "/hello/stream?n=5&gap=0.6"))
            data, closed = read_until_closed(s, 6)
            dt = time.monotonic() - t0
        finally:
            s.close()
        self.assertTrue(closed, "stream past request_timeout_s not cut within 6s: %r" % data)
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data[:200])
        self.assertIn(b"part-1;", data)
        self.assertNotIn(b"part-5;", data)
        self.assertFalse(data.endswith(b"0\r\n\r\n"), "cut stream ended like a complete one")
        self.assertLess(dt, 3.0)

    def test_fast_request_not_timed_out(self):
        r = self.server.get("/hello/ok?sleep=0.2")
        self.assertEqual(r.status, 200, r)

    def test_serves_after_timeouts(self):
        res = run_threads(lambda i: self.server.get("/hello/t%d?sleep=3" % i, timeout=10),
                          [(i,) for i in range(3)], timeout=15)
        self.assertEqual([r.status for r, _ in res if r], [408, 408, 408], res)
        # the replica's slots must come back (timed-out requests cancelled or finished)
        deadline = time.monotonic() + 5
        ok = 0
        while time.monotonic() < deadline and ok < 5:
            r = self.server.get("/hello/ok", timeout=5)
            self.assertEqual(r.status, 200, r)
            ok += 1
        self.assertEqual(ok, 5)


if __name__ == "__main__":
    harness.main()
