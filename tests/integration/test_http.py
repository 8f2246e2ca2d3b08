"""HTTP ingress: routing, keep-alive, pipelining, bodies both ways, request ids, error bodies,
the request object, response shapes, user_config, args and composition."""

import http.client
import json
import socket
import threading
import time

import harness
from harness import (HTTPReader, build_request, hello_app, parse_response_bytes, read_until_closed,
                     run_threads)


FWD_LUA = r'''
local serve = require "moonserve"
local Inner = serve.deployment { name = "Inner" }
function Inner:__call(req)
  if req.path:find("fail") then error("inner failure") end
  return { id = req.id, path = req.path, method = req.method, body = req.body,
           tag = req.headers["x-tag"] }
end
local Outer = serve.deployment { name = "Outer" }
function Outer:init(inner) self.inner = inner end
function Outer:__call(req)
  local out = self.inner:remote(req):result()
  out.outer_id = req.id
  return out
end
return { app = Outer:bind(Inner:bind()) }
'''


class HTTPIngressTest(harness.ServerTestCase):
    APPLICATIONS = [
        hello_app("hello", "/hello", {"num_replicas": 1, "user_config": {"suffix": "!"}}),
        # a longer prefix under /hello goes to another application
        hello_app("deep", "/hello/deep", import_path="hello.lua:build",
                  args={"greeting": "from-deep"}),
        {"name": "echo", "route_prefix": "/echo", "import_path": "echo.lua:app"},
        {"name": "compose", "route_prefix": "/compose", "import_path": "compose.lua:app"},
        {"name": "fwd", "route_prefix": "/fwd", "import_path": "fwd.lua:app"},
        # route_prefix null: deployed but not exposed over HTTP
        {"name": "hidden", "route_prefix": None, "import_path": "echo.lua:app"},
    ]
    FILES = {"fwd.lua": FWD_LUA}

    # -- built-in routes ------------------------------------------------------------------------

    def test_healthz(self):
        r = self.server.get("/-/healthz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.text.strip(), "success")

    def test_routes(self):
        r = self.server.get("/-/routes")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"/hello": "hello", "/hello/deep": "deep", "/echo": "echo",
                                    "/compose": "compose", "/fwd": "fwd"})

    def test_404_json_with_request_id(self):
        r = self.server.get("/no/such/route")
        body = self.assertErrorJSON(r, 404)
        self.assertTrue(body.get("request_id"))
        self.assertIn("json", r.header("content-type", ""), r)

    def test_404_echoes_given_request_id(self):
        r = self.server.get("/nowhere", headers={"X-Request-ID": "rid-404-abc"})
        self.assertEqual(r.status, 404, r)
        self.assertEqual(r.header("x-request-id"), "rid-404-abc")
        self.assertEqual(r.json().get("request_id"), "rid-404-abc")

    # -- routing --------------------------------------------------------------------------------

    def test_longest_prefix_match(self):
        a = self.server.get("/hello/x")
        b = self.server.get("/hello/deep/x")
        c = self.server.get("/hello/deep")
        self.assertEqual(a.status, 200, a)
        self.assertEqual(b.status, 200, b)
        self.assertEqual(c.status, 200, c)
        self.assertEqual(a.json()["app"], "hello")
        self.assertEqual(a.json()["msg"], "hi")
        self.assertEqual(b.json()["app"], "deep")
        self.assertEqual(b.json()["msg"], "from-deep")  # builder got `args`
        self.assertEqual(c.json()["app"], "deep")

    def test_exact_prefix_and_root_of_app(self):
        r = self.server.get("/hello")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["app"], "hello")

    def test_prefix_matches_on_segment_boundary(self):
        r = self.server.get("/hellox")
        self.assertEqual(r.status, 404, "/hellox must not match route_prefix /hello: %r" % r)
        r = self.server.get("/hello/deeper")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["app"], "hello", "/hello/deeper must not match /hello/deep")

    def test_query_string_does_not_affect_routing(self):
        r = self.server.get("/hello?x=1")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["app"], "hello")
        self.assertEqual(r.json()["query"], {"x": "1"})

    # -- request object -------------------------------------------------------------------------

    def test_request_object(self):
        r = self.server.request("POST", "/hello/obj?a=1&b=two", body=b"payload",
                                headers={"X-Custom-Thing": "Val", "Content-Type": "text/plain"})
        self.assertEqual(r.status, 200, r)
        self.assertIn("json", r.header("content-type", ""))
        j = r.json()
        self.assertEqual(j["method"], "POST")
        self.assertTrue(j["path"].endswith("/obj"), j["path"])
        self.assertEqual(j["query"], {"a": "1", "b": "two"})
        self.assertEqual(j["headers"].get("x-custom-thing"), "Val", j["headers"])
        self.assertNotIn("X-Custom-Thing", j["headers"])
        self.assertEqual(j["body"], "payload")
        self.assertEqual(j["id"], r.header("x-request-id"))

    def test_query_decoding(self):
        j = self.server.get("/hello/q?s=a%20b%2Bc&plus=x+y&empty=").json()
        self.assertEqual(j["query"], {"s": "a b+c", "plus": "x y", "empty": ""})

    def test_replica_context_and_user_config(self):
        j = self.server.get("/hello/ctx").json()
        self.assertEqual(j["app"], "hello")
        self.assertEqual(j["deployment"], "Hello")
        self.assertTrue(j["replica"], j)
        self.assertEqual(j["suffix"], "!", "user_config did not reach reconfigure: %r" % j)

    def test_methods_pass_through(self):
        for m in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            r = self.server.request(m, "/hello/m", body=b"x" if m in ("PUT", "PATCH") else None)
            self.assertEqual(r.status, 200, (m, r))
            self.assertEqual(r.json()["method"], m)

    def test_many_headers(self):
        hdrs = {"X-H-%03d" % i: "v%d" % i for i in range(400)}
        r = self.server.get("/hello/h", headers=hdrs)
        self.assertEqual(r.status, 200, r)
        got = r.json()["headers"]
        for i in (0, 199, 399):
            self.assertEqual(got.get("x-h-%03d" % i), "v%d" % i)

    def test_binary_body_into_json_reply(self):
        # a body that is not UTF-8 returned inside a JSON table: an answer, never a crash
        r = self.server.request("POST", "/hello/bin", body=bytes(range(256)))
        self.assertIn(r.status, (200, 500), r)
        if r.status == 200:
            r.json()
        else:
            self.assertErrorJSON(r, 500)
        self.assertEqual(self.server.get("/hello/after").status, 200)

    def test_req_json(self):
        payload = {"k": [1, 2, 3], "s": "x"}
        r = self.server.request("POST", "/hello/json", body=json.dumps(payload).encode(),
                                headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"got": payload})

    def test_string_return_is_text_plain(self):
        r = self.server.get("/hello/text")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.text, "plain hi")
        self.assertIn("text/plain", r.header("content-type", ""))

    def test_serve_response(self):
        r = self.server.get("/hello/status")
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.header("x-custom"), "yes")
        self.assertEqual(r.text, "created")

    def test_composition(self):
        r = self.server.get("/compose?x=7")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json(), {"x": 7, "y": 21, "via": "Model", "deployment": "Ingress"})

    # -- request ids ----------------------------------------------------------------------------

    def test_forwarded_request_keeps_id_and_content(self):
        r = self.server.request("PUT", "/fwd/some/where?q=1", body=b"fwd-body",
                                headers={"X-Request-ID": "fwd-1", "X-Tag": "t1"})
        self.assertEqual(r.status, 200, r)
        j = r.json()
        self.assertEqual(j["outer_id"], "fwd-1")
        self.assertEqual(j["id"], "fwd-1", "handle call did not carry the parent request id")
        self.assertEqual(j["method"], "PUT")
        self.assertEqual(j["body"], "fwd-body")
        self.assertEqual(j["tag"], "t1")
        self.assertTrue(j["path"].endswith("/some/where"), j)

    def test_downstream_error_becomes_500(self):
        r = self.server.get("/fwd/fail", headers={"X-Request-ID": "fwd-fail"})
        body = self.assertErrorJSON(r, 500)
        self.assertEqual(body["request_id"], "fwd-fail")
        self.assertEqual(self.server.get("/fwd/ok").status, 200)

    def test_request_id_echoed(self):
        r = self.server.get("/hello/rid", headers={"X-Request-ID": "my-id-123"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("x-request-id"), "my-id-123")
        self.assertEqual(r.json()["id"], "my-id-123")

    def test_request_id_generated(self):
        a = self.server.get("/hello/rid")
        b = self.server.get("/hello/rid")
        ra, rb = a.header("x-request-id"), b.header("x-request-id")
        self.assertTrue(ra and ra.strip(), a)
        self.assertTrue(rb and rb.strip(), b)
        self.assertNotEqual(ra, rb)
        self.assertEqual(a.json()["id"], ra)

    def test_request_id_with_json_special_chars(self):
        rid = 'a"b\\c<d>'
        r = self.server.get("/nowhere", headers={"X-Request-ID": rid})
        self.assertEqual(r.status, 404, r)
        got = r.header("x-request-id")
        self.assertTrue(got, r)
        body = r.json()  # must stay valid JSON whatever the id holds
        self.assertEqual(body.get("request_id"), got)

    def test_long_request_id(self):
        rid = "L" * 300
        r = self.server.get("/nowhere", headers={"X-Request-ID": rid})
        self.assertEqual(r.status, 404, r)
        got = r.header("x-request-id")
        # docs/http.md: ids of 1-79 printable characters are kept, others replaced
        self.assertRegex(got or "", r"^[0-9a-f]{32}$")
        self.assertEqual(r.json().get("request_id"), got)
        r79 = self.server.get("/nowhere", headers={"X-Request-ID": "K" * 79})
        self.assertEqual(r79.header("x-request-id"), "K" * 79)
        ok = self.server.get("/hello/x", headers={"X-Request-ID": rid})
        self.assertEqual(ok.status, 200, ok)
        self.assertEqual(ok.json()["id"], ok.header("x-request-id"))

    # -- Lua errors -----------------------------------------------------------------------------

    def test_lua_error_500_then_replica_keeps_serving(self):
        before = self.server.get("/hello/who").json()["replica"]
        r = self.server.get("/hello/boom", headers={"X-Request-ID": "boom-1"})
        body = self.assertErrorJSON(r, 500)
        self.assertEqual(body["request_id"], "boom-1")
        # one replica: the very next request goes to the same replica and succeeds
        for _ in range(3):
            ok = self.server.get("/hello/after")
            self.assertEqual(ok.status, 200, ok)
            self.assertEqual(ok.json()["replica"], before)
        r2 = self.server.get("/hello/boom")
        self.assertErrorJSON(r2, 500)
        self.assertEqual(self.server.get("/hello/after").status, 200)

    def test_non_string_error_and_bad_status(self):
        r = self.server.get("/hello/tblerr")
        self.assertErrorJSON(r, 500)
        r = self.server.get("/hello/badstatus")
        self.assertErrorJSON(r, 500)
        self.assertEqual(self.server.get("/hello/after").status, 200)

    # -- connection handling --------------------------------------------------------------------

    def test_keep_alive(self):
        s = self.server.connect()
        try:
            rd = HTTPReader(s)
            for i in range(5):
                s.sendall(build_request("GET", "/hello/ka%d" % i))
                r = rd.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertTrue(r.json()["path"].endswith("/ka%d" % i))
                self.assertNotEqual(r.header("connection", "").lower(), "close", r)
            # also for a 404 and a built-in route on the same connection
            s.sendall(build_request("GET", "/nope"))
            self.assertEqual(rd.read_response().status, 404)
            s.sendall(build_request("GET", "/-/healthz"))
            self.assertEqual(rd.read_response().status, 200)
        finally:
            s.close()

    def test_http10_closes(self):
        s = self.server.connect()
        try:
            s.sendall(b"GET /hello/old HTTP/1.0\r\n\r\n")
            data, closed = read_until_closed(s, 5)
            self.assertTrue(closed, "HTTP/1.0 without keep-alive: connection left open")
            r = parse_response_bytes(data)
            self.assertEqual(r.status, 200, r)
            self.assertFalse(r.chunked, "chunked encoding sent to an HTTP/1.0 client")
        finally:
            s.close()

    def test_pipelining_in_order(self):
        reqs = b"".join(build_request("GET", "/hello/p%d" % i,
                                      headers={"X-Request-ID": "pipe-%d" % i})
                        for i in range(3))
        s = self.server.connect()
        try:
            s.sendall(reqs)  # three requests in one write
            rd = HTTPReader(s)
            for i in range(3):
                r = rd.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("x-request-id"), "pipe-%d" % i)
                self.assertTrue(r.json()["path"].endswith("/p%d" % i))
        finally:
            s.close()

    def test_pipelining_slow_first_stays_in_order(self):
        reqs = (build_request("GET", "/hello/slow?sleep=0.4", headers={"X-Request-ID": "s0"}) +
                build_request("GET", "/hello/fast1", headers={"X-Request-ID": "s1"}) +
                build_request("POST", "/echo", body=b"third", headers={"X-Request-ID": "s2"}))
        s = self.server.connect()
        try:
            s.sendall(reqs)
            rd = HTTPReader(s)
            got = [rd.read_response() for _ in range(3)]
            self.assertEqual([r.header("x-request-id") for r in got], ["s0", "s1", "s2"])
            self.assertEqual([r.status for r in got], [200, 200, 200])
            self.assertEqual(got[2].body, b"third")
        finally:
            s.close()

    def test_pipelined_requests_split_across_writes(self):
        data = b"".join(build_request("POST", "/echo", body=("body-%d" % i).encode())
                        for i in range(4))
        s = self.server.connect()
        try:
            # dribble the bytes in odd-sized pieces to exercise parser resumption
            for i in range(0, len(data), 7):
                s.sendall(data[i:i + 7])
            rd = HTTPReader(s)
            for i in range(4):
                r = rd.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.body, ("body-%d" % i).encode())
        finally:
            s.close()

    def test_pipelining_many(self):
        n = 100
        reqs = b"".join(build_request("GET", "/hello/m%d" % i, headers={"X-Request-ID": "m-%d" % i})
                        for i in range(n))
        s = self.server.connect(timeout=10)
        try:
            s.sendall(reqs)
            rd = HTTPReader(s)
            for i in range(n):
                r = rd.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("x-request-id"), "m-%d" % i)
        finally:
            s.close()

    def test_pipelining_more_than_buffer(self):
        # > 256 KiB of pipelined input while responses are read concurrently: the server must
        # apply back-pressure, not drop or reorder requests
        n, size = 300, 1000
        reqs = b"".join(build_request("POST", "/echo", body=(b"%04d" % i) * (size // 4))
                        for i in range(n))
        s = self.server.connect(timeout=15)
        errs = []

        def sender():
            try:
                s.sendall(reqs)
            except OSError as e:
                errs.append(e)

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        try:
            rd = HTTPReader(s)
            for i in range(n):
                r = rd.read_response()
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.body, (b"%04d" % i) * (size // 4), "response %d" % i)
        finally:
            t.join(10)
            s.close()
        self.assertFalse(errs, errs)

    def test_concurrent_clients(self):
        def client(i):
            conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
            try:
                for j in range(20):
                    conn.request("POST", "/echo", body=("c%d-%d" % (i, j)).encode())
                    r = conn.getresponse()
                    body = r.read()
                    if r.status != 200 or body != ("c%d-%d" % (i, j)).encode():
                        return (r.status, body)
                return "ok"
            finally:
                conn.close()

        res = run_threads(client, [(i,) for i in range(32)], timeout=60)
        bad = [x for x in res if x != ("ok", None)]
        self.assertFalse(bad, bad)

    # -- bodies ---------------------------------------------------------------------------------

    def test_content_length_body(self):
        body = bytes(range(256)) * 40
        r = self.server.request("POST", "/echo", body=body)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, body)

    def test_chunked_request_body(self):
        chunks = [b"hello ", b"chunked ", b"world" * 100, b"!"]
        raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
               b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
        (r,) = self.server.raw(raw)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"".join(chunks))

    def test_chunked_request_body_with_extension_and_trailer(self):
        raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
               b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        r1, r2 = self.server.raw(raw, n_responses=2)
        self.assertEqual(r1.status, 200, r1)
        self.assertEqual(r1.body, b"abcde")
        self.assertEqual(r2.status, 200, r2)

    def test_large_response_body(self):
        n = 65536  # 1 MiB
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/big?n=%d" % n))
            r = HTTPReader(s).read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(r.body), 16 * n)
        self.assertEqual(r.body, b"0123456789abcdef" * n)
        # framing must be valid HTTP/1.1: either chunked or an exact Content-Length
        self.assertTrue(r.chunked or int(r.header("content-length", "-1")) == 16 * n, r.headers)

    def test_large_response_is_chunked(self):
        # docs/http.md: bodies over 256 KiB are streamed to HTTP/1.1 clients chunked
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/big?n=65536"))
            r = HTTPReader(s).read_response()
            self.assertEqual(r.status, 200, r)
            self.assertTrue(r.chunked, "1 MiB response not chunked: %r" % r.headers)
            self.assertNotIn("content-length", r.headers)
            self.assertEqual(r.body, b"0123456789abcdef" * 65536)
            # the chunked framing ended exactly: the same connection serves the next request
            s.sendall(build_request("GET", "/hello/after-big"))
            r2 = HTTPReader(s).read_response()
            self.assertEqual(r2.status, 200, r2)
        finally:
            s.close()

    def test_pipelined_chunked_then_small(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/hello/big?n=32768", headers={"X-Request-ID": "b1"}) +
                      build_request("GET", "/hello/small", headers={"X-Request-ID": "b2"}) +
                      build_request("GET", "/hello/big?n=20000", headers={"X-Request-ID": "b3"}))
            rd = HTTPReader(s)
            got = [rd.read_response() for _ in range(3)]
        finally:
            s.close()
        self.assertEqual([r.header("x-request-id") for r in got], ["b1", "b2", "b3"])
        self.assertEqual(len(got[0].body), 16 * 32768)
        self.assertTrue(got[1].json()["path"].endswith("/small"))
        self.assertEqual(len(got[2].body), 16 * 20000)

    def test_small_response_has_content_length(self):
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/hello/text"))
            r = HTTPReader(s).read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("content-length"), str(len(r.body)))

    def test_large_response_http10_close_delimited(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(b"GET /hello/big?n=65536 HTTP/1.0\r\n\r\n")
            data, closed = read_until_closed(s, 10)
        finally:
            s.close()
        self.assertTrue(closed)
        r = parse_response_bytes(data)
        self.assertEqual(r.status, 200, r)
        self.assertFalse(r.chunked, "chunked sent to an HTTP/1.0 client")
        self.assertEqual(r.body, b"0123456789abcdef" * 65536)

    def test_expect_100_continue(self):
        s = self.server.connect()
        try:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            rd = HTTPReader(s)
            interim = rd.read_response()
            self.assertEqual(interim.status, 100, interim)
            s.sendall(b"hello")
            r = rd.read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"hello")

    def test_connection_close_honoured(self):
        s = self.server.connect()
        try:
            s.sendall(build_request("GET", "/hello/c", headers={"Connection": "close"}))
            data, closed = read_until_closed(s, 5)
        finally:
            s.close()
        self.assertTrue(closed, "Connection: close from the client not honoured")
        self.assertEqual(parse_response_bytes(data).status, 200)

    # -- malformed input ------------------------------------------------------------------------

    def assert_400_and_close(self, raw):
        s = self.server.connect()
        try:
            s.sendall(raw)
            data, closed = read_until_closed(s, 5)
        finally:
            s.close()
        self.assertTrue(data, "no response to malformed request %r" % raw)
        r = parse_response_bytes(data)
        self.assertErrorJSON(r, 400)
        self.assertTrue(closed, "connection not closed after 400 for %r" % raw)

    def test_400_garbage_request_line(self):
        self.assert_400_and_close(b"THIS IS NOT HTTP\r\n\r\n")

    def test_400_bad_version(self):
        self.assert_400_and_close(b"GET /hello HTTP/9Z\r\nHost: x\r\n\r\n")

    def test_400_bad_header(self):
        self.assert_400_and_close(b"GET /hello HTTP/1.1\r\nHost x no colon\r\n\r\n")

    def test_400_bad_chunk_size(self):
        self.assert_400_and_close(b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n")

    def test_400_content_length_and_chunked(self):
        # request smuggling guard: both framings at once is refused
        self.assert_400_and_close(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

    def test_400_conflicting_content_lengths(self):
        self.assert_400_and_close(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                  b"Content-Length: 5\r\n\r\nabcde")

    def test_400_negative_content_length(self):
        self.assert_400_and_close(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n"
                                  b"\r\n")

    def test_chunk_size_overflow(self):
        s = self.server.connect()
        try:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"FFFFFFFFFFFFFFFFFFFF\r\nabc\r\n")
            data, closed = read_until_closed(s, 5)
        finally:
            s.close()
        self.assertTrue(closed)
        r = parse_response_bytes(data)
        self.assertIn(r.status, (400, 413), r)
        self.assertErrorJSON(r, r.status)

    def test_server_survives_malformed_input(self):
        for raw in (b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"\r\n\r\n\r\n" * 10):
            s = self.server.connect()
            try:
                s.sendall(raw)
                read_until_closed(s, 1)
            finally:
                s.close()
        self.assertEqual(self.server.get("/hello/ok").status, 200)


if __name__ == "__main__":
    harness.main()
