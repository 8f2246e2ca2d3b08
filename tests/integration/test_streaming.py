"""Streamed (chunked) responses: serve.stream in a deployment, relayed chunk by chunk through
the controller to the client; an error mid-stream cuts the body short instead of completing it."""

import socket
import time

import harness
from harness import HTTPReader, build_request

STREAM_LUA = r'''
local serve = require "moonserve"
local S = serve.deployment { name = "S" }
function S:__call(req)
  local n = tonumber(req.query.n or "3")
  local gap = tonumber(req.query.gap or "0")
  return serve.stream(function(send)
    for i = 1, n do
      send("chunk-" .. i .. ";")
      if gap > 0 then serve.sleep(gap) end
    end
    if req.query.fail then error("producer failed") end
    send({ done = n })
  end, { headers = { ["X-Stream"] = "yes" } })
end
return { app = S:bind() }
'''


class StreamingTest(harness.ServerTestCase):
    APPLICATIONS = [{"name": "stream", "route_prefix": "/stream", "import_path": "stream.lua:app"}]
    FILES = {"stream.lua": STREAM_LUA}

    def test_chunked_response_body(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/stream?n=3"))
            r = HTTPReader(s).read_response()
        finally:
            s.close()
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.chunked, "a streamed response must be chunked: %r" % r)
        self.assertEqual(r.header("x-stream"), "yes")
        self.assertTrue(r.header("x-request-id"))
        self.assertEqual(r.body, b'chunk-1;chunk-2;chunk-3;{"done":3}')

    def test_first_chunk_arrives_before_the_last_is_produced(self):
        s = self.server.connect(timeout=10)
        try:
            t0 = time.monotonic()
            s.sendall(build_request("GET", "/stream?n=2&gap=0.8"))
            # TCP keeps no message boundaries: the head may arrive on its own, so read until
            # the first chunk is in (bounded by the socket timeout)
            first = b""
            while b"chunk-1;" not in first:
                d = s.recv(65536)
                if not d:
                    break
                first += d
            t_first = time.monotonic() - t0
            rest = b""
            while not rest.endswith(b"0\r\n\r\n"):
                d = s.recv(65536)
                if not d:
                    break
                rest += d
            t_all = time.monotonic() - t0
        finally:
            s.close()
        self.assertIn(b"chunk-1;", first)
        self.assertNotIn(b"done", first)
        # the whole stream takes >= 1.6 s; the first chunk must not wait for it
        self.assertGreaterEqual(t_all, 1.5)
        self.assertLess(t_first, t_all - 0.5)

    def test_error_mid_stream_truncates(self):
        s = self.server.connect(timeout=10)
        try:
            s.sendall(build_request("GET", "/stream?n=2&fail=1"))
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        finally:
            s.close()
        self.assertIn(b"chunk-2;", data)
        # no terminating zero-length chunk: the client can tell the body is incomplete
        self.assertFalse(data.endswith(b"0\r\n\r\n"), data)
        # and the server keeps serving
        r = self.server.get("/stream?n=1")
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    harness.main()
