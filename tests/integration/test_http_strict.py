"""HTTP strictness at the ingress: CONNECT, Upgrade, OPTIONS * and absolute-form targets are
decided at the ingress and never reach (or wedge) a replica connection; obs-fold, missing or
doubled Host, empty header names and oversized chunks are refused; the admin API refuses two
Authorization headers. Everything goes over real sockets."""

import socket

import harness
from harness import HTTPReader, build_request, hello_app, parse_response_bytes, read_until_closed


def exchange_and_close(srv, raw, timeout=5):
    """Sends raw bytes on a fresh connection; returns (response, closed)."""
    s = srv.connect()
    try:
        s.sendall(raw)
        data, closed = read_until_closed(s, timeout)
    finally:
        s.close()
    if not data:
        raise AssertionError("no response to %r" % raw)
    return parse_response_bytes(data), closed


class StrictIngressTest(harness.ServerTestCase):
    # One replica, so every request rides the same pooled replica connection(s).
    APPLICATIONS = [
        hello_app("hello", "/hello", {"num_replicas": 1, "max_ongoing_requests": 4}),
        {"name": "echo", "route_prefix": "/echo", "import_path": "echo.lua:app"},
    ]
    HTTP_OPTIONS = {"max_body_bytes": 1000}

    def assert_refused(self, raw, status=400):
        r, closed = exchange_and_close(self.server, raw)
        self.assertErrorJSON(r, status)
        self.assertTrue(closed, "connection left open after %d for %r" % (status, raw))
        return r

    def victim(self, i):
        rid = "victim-%d" % i
        r = self.server.get("/hello/victim", headers={"X-Request-ID": rid})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-request-id"), rid, r)
        self.assertEqual(r.json()["id"], rid, r)

    # -- no request crosses into another client's ----------------------------------------------

    def test_connect_is_refused_and_victims_keep_their_answers(self):
        # A path target reached the deployment before the fix; authority-form is CONNECT's own.
        for round_, target in enumerate((b"/hello/tunnel", b"example.com:443", b"/hello/t")):
            rid = "attacker-%d" % round_
            r, closed = exchange_and_close(
                self.server, b"CONNECT " + target + b" HTTP/1.1\r\nHost: example.com:443\r\n"
                b"X-Request-ID: " + rid.encode() + b"\r\n\r\n")
            # The victims first: before the fix the attacker wedged the replica connection.
            for i in range(10):
                self.victim(round_ * 100 + i)
            self.assertErrorJSON(r, 501)
            self.assertEqual(r.header("x-request-id"), rid)
            self.assertTrue(closed)

    def test_connect_with_tunnel_bytes_does_not_reach_the_replica(self):
        # Bytes a tunnel client sends at once after CONNECT are never read as a request.
        r, closed = exchange_and_close(
            self.server, b"CONNECT /hello/x HTTP/1.1\r\nHost: x\r\n\r\n"
            + build_request("GET", "/hello/smuggled", {"X-Request-ID": "smuggled"}))
        self.assertEqual(r.status, 501, r)
        self.assertTrue(closed)
        for i in range(10):
            self.victim(i)

    def upgrade_on_one_connection(self, upgrade_headers):
        s = self.server.connect()
        try:
            rd = HTTPReader(s)
            hdrs = {"Connection": "Upgrade", "X-Request-ID": "up-1"}
            hdrs.update(upgrade_headers)
            s.sendall(build_request("GET", "/hello/up", hdrs))
            first = rd.read_response()
            s.sendall(build_request("GET", "/hello/after", {"X-Request-ID": "up-2"}))
            second = rd.read_response()
        finally:
            s.close()
        # The Upgrade is ignored (RFC 9110 section 7.8): a plain answer, no 101.
        self.assertEqual(first.status, 200, first)
        self.assertEqual(first.json()["path"], "/hello/up")
        self.assertNotIn("upgrade", first.json()["headers"].get("connection", "").lower())
        self.assertEqual(second.status, 200, second)
        self.assertEqual(second.header("x-request-id"), "up-2")
        self.assertEqual(second.json()["path"], "/hello/after")
        for i in range(5):
            self.victim(i)

    def test_websocket_upgrade_keeps_the_connection_usable(self):
        self.upgrade_on_one_connection({"Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})

    def test_h2c_upgrade_keeps_the_connection_usable(self):
        self.upgrade_on_one_connection({"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings",
                                        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"})

    def test_upgrade_pipelined_with_the_next_request(self):
        raw = (build_request("POST", "/echo", {"Connection": "Upgrade", "Upgrade": "websocket"},
                             body=b"abc")
               + build_request("GET", "/hello/next", {"X-Request-ID": "next-1"}))
        first, second = self.server.raw(raw, n_responses=2)
        self.assertEqual((first.status, first.body), (200, b"abc"), first)
        self.assertEqual(second.status, 200, second)
        self.assertEqual(second.header("x-request-id"), "next-1")

    def test_options_asterisk_is_answered_at_the_ingress(self):
        raw = (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nX-Request-ID: opt-1\r\n\r\n"
               + build_request("GET", "/hello/after-options"))
        first, second = self.server.raw(raw, n_responses=2)
        self.assertEqual(first.status, 200, first)
        self.assertIn("GET", first.header("allow", ""))
        self.assertEqual(first.header("x-request-id"), "opt-1")
        self.assertEqual(first.body, b"")
        self.assertEqual(second.json()["path"], "/hello/after-options")

    def test_asterisk_with_another_method_is_refused(self):
        self.assert_refused(b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_absolute_form_is_resolved_to_its_path(self):
        r = self.server.raw(b"GET http://api.example/hello/abs?a=1 HTTP/1.1\r\nHost: other\r\n"
                            b"\r\n")[0]
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(body["path"], "/hello/abs")
        self.assertEqual(body["query"], {"a": "1"})
        # RFC 9112 section 3.2.2: the target's authority replaces Host.
        self.assertEqual(body["headers"]["host"], "api.example")

    def test_absolute_form_without_path_is_the_root(self):
        r = self.server.raw(b"GET HTTPS://api.example?x=1 HTTP/1.1\r\nHost: api.example\r\n\r\n")[0]
        self.assertErrorJSON(r, 404)
        self.assertIn("Path '/'", r.json()["error"])

    def test_other_targets_are_refused(self):
        for target in (b"hello/x", b"ftp://h/hello/x", b"http:///hello/x",
                       b"http://user@h/hello/x"):
            self.assert_refused(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")

    # -- strictness ----------------------------------------------------------------------------

    def test_obs_fold_in_transfer_encoding(self):
        self.assert_refused(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked"
                            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    def test_obs_fold_in_any_header(self):
        self.assert_refused(b"GET /hello/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n")
        self.assert_refused(b"GET /hello/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n")
        self.assert_refused(b"GET /hello/x HTTP/1.1\r\nHost: x\r\nX-A:\r\n \r\n\r\n")

    def test_obs_fold_split_across_reads(self):
        raw = b"GET /hello/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"
        cut = raw.index(b"\r\n b")
        for at in (cut, cut + 1, cut + 2, cut + 3):
            s = self.server.connect()
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(raw[:at])
                # Up to the fold's whitespace the head is valid so far and nothing is answered:
                # waiting for an answer that does not come lets the server read the part alone.
                early, _ = read_until_closed(s, 0.2)
                if early:
                    data = early + read_until_closed(s, 5)[0]
                else:
                    s.sendall(raw[at:])
                    data, _ = read_until_closed(s, 5)
            finally:
                s.close()
            self.assertErrorJSON(parse_response_bytes(data), 400)

    def test_whitespace_in_body_is_not_a_fold(self):
        s = self.server.connect()
        try:
            rd = HTTPReader(s)
            head = build_request("POST", "/echo", {"Content-Length": "6"})
            for piece in (head[:-1], head[-1:] + b"\n a\n\tb"):
                s.sendall(piece)
            r = rd.read_response()
        finally:
            s.close()
        self.assertEqual((r.status, r.body), (200, b"\n a\n\tb"), r)

    def test_headers_sent_byte_by_byte(self):
        s = self.server.connect()
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rd = HTTPReader(s)
            for b in build_request("GET", "/hello/slow", {"X-Long": "a  b", "X-Request-ID": "bb"}):
                s.sendall(bytes([b]))
            r = rd.read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["headers"]["x-long"], "a  b")

    def test_http11_without_host(self):
        self.assert_refused(b"GET /hello/x HTTP/1.1\r\nX-Request-ID: nohost\r\n\r\n")

    def test_two_host_headers(self):
        r = self.assert_refused(b"GET /hello/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n"
                                b"X-Request-ID: twohosts\r\n\r\n")
        self.assertEqual(r.header("x-request-id"), "twohosts")
        self.assert_refused(b"GET /hello/x HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n")

    def test_http10_without_host_is_served(self):
        r, _ = exchange_and_close(self.server, b"GET /hello/old HTTP/1.0\r\n\r\n")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["path"], "/hello/old")

    def test_empty_header_name(self):
        self.assert_refused(b"GET /hello/x HTTP/1.1\r\nHost: x\r\n: x\r\n\r\n")

    def test_chunk_larger_than_the_body_limit_is_refused_at_its_header(self):
        s = self.server.connect()
        try:
            # 0x100000 bytes announced, none sent: the answer must not wait for them.
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"X-Request-ID: bigchunk\r\n\r\n100000\r\n")
            data, closed = read_until_closed(s, 5)
        finally:
            s.close()
        r = parse_response_bytes(data)
        self.assertErrorJSON(r, 413)
        self.assertEqual(r.header("x-request-id"), "bigchunk")
        self.assertTrue(closed)

    def test_chunks_within_the_limit_still_pass(self):
        body = b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"
        r = self.server.raw(build_request("POST", "/echo", {"Transfer-Encoding": "chunked"}, body))
        self.assertEqual((r[0].status, len(r[0].body)), (200, 1000), r[0])


class StrictAdminTest(harness.ServerTestCase):
    APPLICATIONS = [hello_app("hello", "/hello")]
    EXTRA_CONFIG = {"admin": {"token": "adm-token"}}

    def admin_raw(self, raw):
        # the admin listener answers only its own Host names (DNS-rebinding guard)
        raw = raw.replace(b"Host: x\r\n",
                          b"Host: 127.0.0.1:%d\r\n" % self.server.admin_port, 1)
        s = socket.create_connection((self.server.host, self.server.admin_port), timeout=5)
        try:
            s.sendall(raw)
            return HTTPReader(s).read_response()
        finally:
            s.close()

    def test_two_authorization_headers(self):
        for second in (b"Bearer adm-token", b"Bearer other"):
            r = self.admin_raw(b"GET /api/serve/applications/ HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer adm-token\r\nAuthorization: " + second
                               + b"\r\nConnection: close\r\n\r\n")
            self.assertErrorJSON(r, 400)
            self.assertIn("Authorization", r.json()["error"])

    def test_one_authorization_header_still_works(self):
        r = self.admin_raw(b"GET /api/serve/applications/ HTTP/1.1\r\nHost: x\r\n"
                           b"Authorization: Bearer adm-token\r\nConnection: close\r\n\r\n")
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    harness.main()
