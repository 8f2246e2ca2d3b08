"""Prefix-cache affinity through the real engine: examples/llm/llm_server.py as a process
deployment of 3 replicas, the same short multi-turn chat replay sent with the default router and
with scripts/routers/prefix_cache.lua. The prefix router's cache hit rate (as the replicas report
it) must be clearly above the default's and its mean time to first token lower. Plus SSE
pass-through: chunks arrive one by one (not buffered to the end) with their framing intact.

Needs process deployments (docs/process-replicas.md) in the engine."""

import json
import os
import socket
import sys
import tempfile
import time
import unittest

import harness

sys.path.insert(0, os.path.join(harness.SOURCE_DIR, "scripts", "tools", "bench"))
import llm_prefix  # noqa: E402  (replay, config and client shared with the benchmark)

REPLICAS = 3


def serve(testcase, router):
    d = testcase.tmp.name
    config, port, admin = llm_prefix.run_config(d, REPLICAS, router)
    proc = llm_prefix.start(harness.BIN, config, admin, REPLICAS)
    testcase.addCleanup(llm_prefix.stop, proc)
    return port


class LLMRoutingTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="moonserve-llm-")
        self.addCleanup(self.tmp.cleanup)

    def test_prefix_router_beats_default(self):
        requests = llm_prefix.replay(convs=18, turns=4, systems=3, seed=3)
        out = {}
        for name, router in (("default", None), ("prefix", llm_prefix.ROUTER)):
            # one server at a time, stopped before the next starts (measure() owns it)
            out[name] = llm_prefix.measure(harness.BIN, REPLICAS, requests, 4, router)
        oracle = llm_prefix.oracle_hit_rate(requests)
        print("default %s\nprefix  %s\noracle hit rate %.3f" % (out["default"], out["prefix"], oracle))
        # The shared system prompts are cached everywhere whatever the routing: what affinity can
        # add is the gap up to the oracle's rate, and it must win most of it.
        gap = oracle - out["default"]["hit_rate"]
        self.assertGreater(gap, 0.1, out)
        self.assertGreater(out["prefix"]["hit_rate"], out["default"]["hit_rate"] + 0.5 * gap, out)
        self.assertLess(out["prefix"]["mean_ms"], out["default"]["mean_ms"], out)
        self.assertEqual(len(out["prefix"]["per_replica"]), REPLICAS, out)  # all replicas used

    def test_sse_pass_through(self):
        port = serve(self, llm_prefix.ROUTER)
        body = json.dumps({"model": "m", "stream": True, "max_tokens": 20,
                           "messages": [{"role": "user", "content": "stream please"}]})
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(s.close)
        s.sendall(harness.build_request("POST", "/v1/chat/completions",
                                        {"Content-Type": "application/json"}, body))
        # Read as bytes arrive: with 1 ms between tokens, a proxy that buffered the whole answer
        # would deliver everything in one read after ~20 ms; a streaming one in several reads.
        data, reads, first, last = b"", 0, None, None
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            now = time.monotonic()
            first = first or now
            last = now
            reads += 1
            data += chunk
        r = harness.parse_response_bytes(data)
        self.assertEqual(r.status, 200, r)
        self.assertIn("text/event-stream", r.header("content-type", ""))
        self.assertTrue(r.chunked, r)
        events = r.body.split(b"\n\n")
        self.assertEqual(events[-1], b"", r.body[-200:])  # ends on an event boundary
        events = events[:-1]
        self.assertEqual(events[-1], b"data: [DONE]")
        chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
        self.assertEqual(len(chunks), 21)  # 20 tokens + the finish chunk with usage
        self.assertTrue(all(c["object"] == "chat.completion.chunk" for c in chunks))
        self.assertIn("usage", chunks[-1])
        self.assertGreater(reads, 2, "the stream arrived in %d reads" % reads)
        self.assertGreater(last - first, 0.01)


if __name__ == "__main__":
    harness.main()
