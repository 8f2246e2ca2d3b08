"""Faults on the request path's data link (issue 8, points 2, 5 and 7), on the real binary.

* Replica death (`kill -9`): only the requests that were on the killed replica may fail, each
  with a JSON 502 carrying its request id; a dead replica leaves routing at once, and a request
  that could not be written to it is routed again to another replica (docs/operations.md,
  Replicas; docs/replica-protocol.md, Failures). Under load from 32 clients with replicas killed
  over and over, and one idle replica killed right before 50 sequential requests.
* Backpressure: clients that stop reading a 200 MiB streamed response, or a 64 MiB whole
  response, make the controller hold at most a window of each (its RSS stays within 64 MiB of
  where it was), the bodies arrive whole and correct once the clients read on, and the memory
  goes back afterwards; large uploads to a replica that cannot take them are held once by the
  controller, not twice (docs/replica-protocol.md, Flow control; docs/architecture.md).
* Request timeout on a stuck replica: the 408 goes out, but the request keeps the stuck
  replica's only slot until the replica answers, so the next requests all go to the other
  replica (docs/operations.md, Replicas).

Every test starts its own server. Waits are polls of a condition with a deadline. A "stuck"
handler blocks its replica's whole loop (not `serve.sleep`, which a cancellation ends at once)
until the test creates a release file, so nothing here waits for a stuck replica to time out.
"""

import os
import random
import signal
import threading
import time
import unittest
import urllib.parse
import zlib

import harness
from harness import HTTPReader, LoadGen, build_request, rss_mib, run_threads, wait_until

MIB = 1 << 20
PIECE = 64 * 1024  # one serve.stream send, and one block of the whole body

FAULTS_LUA = r'''
local serve = require "moonserve"
local ffi = require "ffi"
ffi.cdef [[ int poll(void *fds, unsigned long nfds, int timeout); ]]

local PIECE = 65536

-- Block i of every large body: its number as 7 digits and a newline, repeated over 64 KiB.
local function piece(i)
  return string.format("%07d\n", i % 10000000):rep(PIECE / 8)
end

local function exists(path)
  local f = io.open(path, "r")
  if f then f:close() end
  return f ~= nil
end

local function write(path, text)
  local f = assert(io.open(path .. ".tmp", "w"))
  f:write(text)
  f:close()
  assert(os.rename(path .. ".tmp", path))
end

local F = serve.deployment { name = "F" }

function F:init(opts)
  if opts and opts.whole_mib then
    local parts = {}
    for i = 1, opts.whole_mib * 1048576 / PIECE do parts[i] = piece(i) end
    self.whole = table.concat(parts)
  end
end

function F:__call(req)
  local ctx = serve.get_replica_context()
  local q = req.query
  if req.path:find("/stuck", 1, true) then
    -- Blocks the replica's loop (it reads nothing, answers nothing, not even a cancellation)
    -- until the release file appears or `max` seconds pass.
    write(q.marker, tostring(ctx.replica_id))
    local deadline = os.time() + tonumber(q.max or "30")
    while not exists(q.release) and os.time() < deadline do ffi.C.poll(nil, 0, 20) end
    return { replica = ctx.replica_id, stuck = true }
  end
  if req.path:find("/stream", 1, true) then
    local n = tonumber(q.pieces)
    return serve.stream(function(send)
      for i = 1, n do send(piece(i)) end
    end, { headers = { ["Content-Type"] = "application/octet-stream" } })
  end
  if req.path:find("/whole", 1, true) then
    return serve.response { status = 200, body = self.whole,
                            headers = { ["Content-Type"] = "application/octet-stream" } }
  end
  if req.path:find("/upload", 1, true) then
    local b = req.body
    return { len = #b, head = b:sub(1, 16), tail = b:sub(-16), replica = ctx.replica_id }
  end
  serve.sleep(tonumber(q.sleep or "0.005"))
  return { replica = ctx.replica_id, path = req.path }
end

return { app = F:bind({}), whole = F:bind({ whole_mib = 64 }) }
'''

FILES = {"faults.lua": FAULTS_LUA}


def faults_app(deployment, attr="app"):
    d = {"name": "F"}
    d.update(deployment)
    return {"name": "f", "route_prefix": "/f", "import_path": "faults.lua:" + attr,
            "deployments": [d]}


def start_measured_server(testcase, deployment, attr="app"):
    """A server whose controller's RSS is measured: under AddressSanitizer its quarantine is
    turned off, so that freed buffers leave RSS as they do in a release build (with the
    default quarantine of 256 MiB, memory freed on time would look held)."""
    saved = os.environ.get("ASAN_OPTIONS")
    os.environ["ASAN_OPTIONS"] = ((saved or "detect_leaks=1:abort_on_error=0") +
                                  ":quarantine_size_mb=0")
    try:
        return harness.start_server(testcase, [faults_app(deployment, attr)], files=FILES)
    finally:
        if saved is None:
            del os.environ["ASAN_OPTIONS"]
        else:
            os.environ["ASAN_OPTIONS"] = saved


def peak_rss_mib(pid, seconds, above=None):
    """The highest RSS seen while watching the process for `seconds` (sampled every 20 ms),
    stopping early once it passes `above`. An observation over a fixed window, not a wait: what
    is checked is that nothing happens (memory does not grow) while clients hold still."""
    peak, t_end = rss_mib(pid), time.monotonic() + seconds
    while time.monotonic() < t_end and (above is None or peak <= above):
        time.sleep(0.02)
        peak = max(peak, rss_mib(pid))
    return peak


def expected_crc(n_pieces):
    """crc32 of the body the Lua app sends: pieces 1..n_pieces (see piece() in FAULTS_LUA)."""
    crc = 0
    for i in range(1, n_pieces + 1):
        crc = zlib.crc32((b"%07d\n" % (i % 10000000)) * (PIECE // 8), crc)
    return crc


class BodyCheck(object):
    """Takes a response body as it arrives (chunked or Content-Length) and keeps only its size
    and crc32, so 200 MiB bodies are checked without being held."""

    def __init__(self, chunked, length=None):
        self.chunked = chunked
        self.length = length
        self.size = 0
        self.crc = 0
        self.done = (not chunked and length == 0)
        self.buf = b""
        self.left = 0  # bytes left in the current chunk
        self.state = "size"

    def _take(self, data):
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)

    def feed(self, data):
        if not self.chunked:
            self._take(data)
            if self.size > self.length:
                raise AssertionError("body longer than Content-Length %d" % self.length)
            self.done = self.size == self.length
            return
        self.buf += data
        while not self.done:
            if self.state == "data":
                if not self.buf:
                    return
                n = min(self.left, len(self.buf))
                self._take(self.buf[:n])
                self.buf = self.buf[n:]
                self.left -= n
                if self.left:
                    return
                self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    return
                if self.buf[:2] != b"\r\n":
                    raise AssertionError("chunk not followed by CRLF: %r" % self.buf[:20])
                self.buf = self.buf[2:]
                self.state = "size"
            else:  # "size" or "trailer": a line
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    if len(self.buf) > 4096:
                        raise AssertionError("chunk size line too long")
                    return
                self.buf = rest
                if self.state == "trailer":
                    self.done = line == b""
                    continue
                self.left = int(line.split(b";")[0].strip(), 16)
                self.state = "data" if self.left else "trailer"


class StalledReader(object):
    """A raw-socket client that sends one GET, reads the head and a little of the body, and then
    reads nothing more until drain() is called."""

    def __init__(self, server, path, timeout=30.0):
        self.sock = server.connect(timeout=timeout)
        self.sock.sendall(build_request("GET", path))
        data = b""
        while b"\r\n\r\n" not in data:
            d = self.sock.recv(65536)
            if not d:
                raise AssertionError("connection closed before the head: %r" % data[:300])
            data += d
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for h in lines[1:]:
            k, _, v = h.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = None if chunked else int(self.headers.get("content-length", "-1"))
        if not chunked and length < 0:
            raise AssertionError("neither chunked nor Content-Length: %r" % head)
        self.body = BodyCheck(chunked, length)
        self.body.feed(rest)
        while self.body.size == 0 and not self.body.done:  # "a little" of the body
            d = self.sock.recv(65536)
            if not d:
                raise AssertionError("connection closed before the body")
            self.body.feed(d)

    def drain(self):
        """Read the rest of the body; returns (size, crc32)."""
        while not self.body.done:
            d = self.sock.recv(1 << 18)
            if not d:
                raise AssertionError("connection closed after %d body bytes" % self.body.size)
            self.body.feed(d)
        return self.body.size, self.body.crc

    def close(self):
        self.sock.close()


class FaultTestCase(unittest.TestCase):
    assertErrorJSON = harness.ServerTestCase.assertErrorJSON


class ReplicaKillTest(FaultTestCase):
    """kill -9 fails only what was on the dead replica (issue 8 point 2)."""

    def test_kill_9_under_load_fails_only_requests_on_the_dead_replica(self):
        """4 replicas with max_ongoing_requests 2, 32 clients sending 5 ms requests for ~9 s; a
        random running replica is killed each time the last replacement is running again and
        200 more requests succeeded. At most 2 requests (the ones on the victim) may fail per
        kill, each a JSON 502 with its request id; a request that never reached the victim (the
        24 queued ones, and any routed to it in the instant it died) must be served elsewhere."""
        cap = 2
        srv = harness.start_server(self, [faults_app({"num_replicas": 4,
                                                      "max_ongoing_requests": cap})], files=FILES)
        srv.wait_serving_replicas("/f/warm", 4)
        killed = set()

        def four_running():
            reps = srv.running_replicas("f", "F")
            pids = [r.get("pid") for r in reps]
            ok = len(pids) == 4 and not (set(pids) & killed) and all(
                p and harness.is_alive(p) for p in pids)
            return pids if ok else None

        load = LoadGen(srv, "/f/work?c={i}-{k}", 32, timeout=10.0)
        kills = 0
        t_end = time.monotonic() + 9.0
        with load:
            while time.monotonic() < t_end - 0.5:
                with load.lock:
                    ok_at_kill = load.count - len(load.failures)
                pids = wait_until(four_running, max(0.1, t_end - time.monotonic()))

                def enough_served():
                    with load.lock:
                        return load.count - len(load.failures) >= ok_at_kill + 200
                if not pids or not wait_until(enough_served, max(0.1, t_end - time.monotonic()),
                                              0.01):
                    break
                victim = random.choice(pids)
                killed.add(victim)
                os.kill(victim, signal.SIGKILL)
                kills += 1
        with load.lock:
            failures = list(load.failures)
            total = load.count
        self.assertGreaterEqual(kills, 3, "only %d kills in 9 s (replacements too slow?); "
                                "stderr:\n%s" % (kills, srv.stderr_tail()))
        self.assertGreater(total - len(failures), 1000, "too few requests served: %d of %d"
                           % (total - len(failures), total))
        summary = "%d of %d requests failed after %d kills (at most %d may): %r" % (
            len(failures), total, kills, kills * cap, failures[:8])
        self.assertLessEqual(len(failures), kills * cap, summary)
        for r in failures:
            self.assertIsInstance(r, harness.Response, "not an HTTP answer: %r; %s" % (r, summary))
            self.assertErrorJSON(r, 502)
        four_running_at_end = wait_until(four_running, 10)
        self.assertTrue(four_running_at_end, "4 replicas not running again after the kills")
        srv.stop()

    def test_idle_replica_killed_then_50_sequential_requests_all_served(self):
        """2 idle replicas (both have served, so both have a data link); one is killed and, as
        soon as the kernel has it dead, 50 sequential requests are sent: all must be 200. The
        first ones may reach the controller before it read the link's EOF: a request it could
        not write to the dead replica never ran there, and is routed to the other one. (Sent
        before the victim is dead, a request can be written to it while it dies, and then a
        502 is right: it had reached the replica. So the test waits for the death first.)"""
        srv = harness.start_server(self, [faults_app({"num_replicas": 2})], files=FILES)
        srv.wait_serving_replicas("/f/warm", 2)
        pids = [r["pid"] for r in srv.running_replicas("f", "F")]
        self.assertEqual(len(pids), 2, pids)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: not harness.is_alive(victim), 5, 0.001),
                        "replica %d still alive after SIGKILL" % victim)
        answers = []
        for i in range(50):
            try:
                r = srv.get("/f/after?i=%d" % i, timeout=5)
                answers.append(r.status if r.status == 200 else r)
            except Exception as e:  # noqa: a hang or reset is a failure too
                answers.append(e)
        bad = [(i, a) for i, a in enumerate(answers) if a != 200]
        self.assertFalse(bad, "requests failed after an idle replica was killed: %r" % bad)
        srv.wait_replicas(2, timeout=10, exclude=[victim])
        srv.stop()


class BackpressureTest(FaultTestCase):
    """A client that stops reading holds back only its own response (issue 8 point 5)."""

    CLIENTS = 5
    GROWTH_MIB = 64  # the controller may grow this much while the readers are stalled
    RETURN_MIB = 32  # and must come back this close to its baseline once they are done

    def stall_then_drain(self, srv, path, n_pieces):
        total = n_pieces * PIECE
        warm = StalledReader(srv, "/f/stream?pieces=4")  # link and buffers set up
        self.assertEqual(warm.drain(), (4 * PIECE, expected_crc(4)))
        warm.close()
        baseline = rss_mib(srv.pid)
        readers = []
        try:
            for _ in range(self.CLIENTS):
                readers.append(StalledReader(srv, path))
            for rd in readers:
                self.assertEqual(rd.status, 200, rd.headers)
            # Every reader is stalled now: watch the controller for a bounded window.
            peak = max(baseline, peak_rss_mib(srv.pid, 3.0, above=baseline + self.GROWTH_MIB))
            self.assertLessEqual(
                peak - baseline, self.GROWTH_MIB,
                "controller RSS grew from %.0f MiB to %.0f MiB while %d clients were not "
                "reading %s (%d MiB each): it buffers what the clients do not take"
                % (baseline, peak, self.CLIENTS, path, total // MIB))
            # Reading resumes: every body arrives whole and correct.
            want = (total, expected_crc(n_pieces))
            res = run_threads(lambda rd: rd.drain(), [(rd,) for rd in readers], timeout=90)
            for i, (got, err) in enumerate(res):
                self.assertIsNone(err, "reader %d: %r" % (i, err))
                self.assertEqual(got, want, "reader %d: (size, crc32) %r, want %r"
                                 % (i, got, want))
        finally:
            for rd in readers:
                rd.close()
        # Done and closed: the memory goes back.
        back = wait_until(lambda: rss_mib(srv.pid) - baseline <= self.RETURN_MIB, 10, 0.05)
        self.assertTrue(back, "controller RSS still %.0f MiB, baseline was %.0f MiB"
                        % (rss_mib(srv.pid), baseline))

    def test_stalled_readers_of_a_200_mib_stream(self):
        """5 clients request a 200 MiB serve.stream (64 KiB sends) and stop reading after the
        head: without backpressure the replica produces at full speed and the controller holds
        the whole 1,000 MiB; with it, about a window per stream."""
        srv = start_measured_server(self, {"num_replicas": 1, "max_ongoing_requests": 8})
        self.stall_then_drain(srv, "/f/stream?pieces=%d" % (200 * MIB // PIECE),
                              200 * MIB // PIECE)
        srv.stop()

    def test_stalled_readers_of_a_64_mib_whole_body(self):
        """The same with a whole (Content-Length) response: one 64 MiB string built once in
        init, returned by every request. 5 stalled readers would hold 320 MiB in the controller
        without backpressure."""
        srv = start_measured_server(self, {"num_replicas": 1, "max_ongoing_requests": 8},
                                    "whole")
        self.stall_then_drain(srv, "/f/whole", 64 * MIB // PIECE)
        srv.stop()

    def test_large_uploads_to_a_stuck_replica_are_held_once(self):
        """4 uploads of 32 MiB (under the default max_body_bytes of 64 MiB) to a replica whose
        loop is blocked by a handler, so it reads nothing from its link meanwhile.

        A Content-Length body is read whole before its request is routed (a never-sent request
        must be routable again), so while it cannot be written to the replica the controller
        holds it once: 4 x 32 = 128 MiB is the floor. An engine that copies each body into the
        link's output buffer and keeps the request's own buffer as well holds it twice, 256 MiB,
        for as long as the replica does not read. The bound is 1.5 copies, 192 MiB over the
        baseline, on the controller's RSS sampled for a second once every body was sent: a
        steady state while the replica is blocked, so sampling sees it. (Not VmHWM: the body
        buffer's growth by doubling has a short two-copy peak under ASan, whose realloc copies.)
        Afterwards the replica is released and every upload must be answered with its own body
        (length, first and last 16 bytes)."""
        n, size = 4, 32 * MIB
        srv = start_measured_server(self, {"num_replicas": 1, "max_ongoing_requests": 8})
        self.assertEqual(srv.get("/f/warm").status, 200)
        marker, release = os.path.join(srv.dir, "stuck"), os.path.join(srv.dir, "release")
        self.addCleanup(lambda: open(release, "a").close())
        baseline = rss_mib(srv.pid)
        q = urllib.parse.urlencode({"marker": marker, "release": release, "max": 60})
        stuck_res = []

        def hold():
            try:
                stuck_res.append(srv.get("/f/stuck?" + q, timeout=90))
            except Exception as e:  # noqa: reported below
                stuck_res.append(e)
        stuck = threading.Thread(target=hold, daemon=True)
        stuck.start()
        self.assertTrue(wait_until(lambda: os.path.exists(marker), 10),
                        "the blocking handler did not start")

        sent = []
        lock = threading.Lock()

        def upload(i):
            unit = b"upload-%02d-data.\n" % i  # 16 bytes
            body = unit * (size // len(unit))
            s = srv.connect(timeout=90)
            try:
                s.sendall(build_request("POST", "/f/upload?i=%d" % i,
                                        {"Content-Type": "application/octet-stream",
                                         "Content-Length": str(size)}))
                s.sendall(body)
                del body
                with lock:
                    sent.append(i)
                return unit, HTTPReader(s).read_response()
            finally:
                s.close()

        results = [None] * n  # (unit, response) or the exception

        def run(i):
            try:
                results[i] = upload(i)
            except Exception as e:  # noqa: reported below
                results[i] = e
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        self.assertTrue(wait_until(lambda: len(sent) == n, 60),
                        "uploads not taken by the controller: %d of %d sent" % (len(sent), n))
        # The last bytes may still be in the kernel: watch while the controller takes them.
        peak = max(baseline, peak_rss_mib(srv.pid, 1.0))
        self.assertFalse(os.path.exists(release))
        self.assertLessEqual(
            peak - baseline, 1.5 * n * size / MIB,
            "controller RSS %.0f MiB (baseline %.0f MiB) with %d uploads of %d MiB waiting "
            "for a replica: more than one copy of each body" % (peak, baseline, n, size // MIB))

        open(release, "a").close()
        for t in threads:
            t.join(60)
        for i, res in enumerate(results):
            self.assertIsInstance(res, tuple, "upload %d got no answer: %r" % (i, res))
            unit, r = res
            self.assertEqual(r.status, 200, r)
            j = r.json()
            self.assertEqual((j["len"], j["head"], j["tail"]),
                             (size, unit.decode(), unit.decode()), "upload %d" % i)
        stuck.join(30)
        self.assertEqual([getattr(r, "status", r) for r in stuck_res], [200], stuck_res)
        srv.stop()


class StuckReplicaTimeoutTest(FaultTestCase):
    """A request timeout keeps a stuck replica's slot taken (issue 8 point 7)."""

    def test_timed_out_request_keeps_the_stuck_replicas_slot(self):
        """2 replicas, max_ongoing_requests 1, request_timeout_s 0.5. /stuck blocks its
        replica's loop (the replica cannot even take the cancellation): the client gets a JSON
        408, and the stuck replica's only slot stays taken, so 10 sequential requests are all
        answered 200 by the other replica. Once the stuck handler returns, the replica serves
        again (the slot is given back when it answers)."""
        srv = harness.start_server(
            self, [faults_app({"num_replicas": 2, "max_ongoing_requests": 1})], files=FILES,
            http_options={"request_timeout_s": 0.5})
        srv.wait_serving_replicas("/f/warm", 2)
        marker, release = os.path.join(srv.dir, "stuck"), os.path.join(srv.dir, "release")
        self.addCleanup(lambda: open(release, "a").close())
        q = urllib.parse.urlencode({"marker": marker, "release": release, "max": 30})
        r = srv.get("/f/stuck?" + q, timeout=10)
        self.assertErrorJSON(r, 408)
        self.assertTrue(wait_until(lambda: os.path.exists(marker), 5), "/stuck never ran")
        with open(marker) as f:
            stuck_id = f.read().strip()

        answers = []
        for i in range(10):
            try:
                r = srv.get("/f/after?i=%d" % i, timeout=5)
                answers.append((r.status, r.json().get("replica") if r.status == 200 else r))
            except Exception as e:  # noqa: a hang is a failure too
                answers.append((None, e))
        bad = [(i, a) for i, a in enumerate(answers)
               if a[0] != 200 or str(a[1]) == stuck_id]
        self.assertFalse(bad, "with replica %s stuck, requests were not all answered by the "
                         "other one: %r" % (stuck_id, bad))

        open(release, "a").close()

        def stuck_one_serves():
            r = srv.get("/f/back", timeout=5)
            return r.status == 200 and str(r.json().get("replica")) == stuck_id
        self.assertTrue(wait_until(stuck_one_serves, 10),
                        "replica %s never served again after its handler returned" % stuck_id)
        srv.stop()


if __name__ == "__main__":
    harness.main()
