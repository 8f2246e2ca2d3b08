#!/usr/bin/env python3
"""A simulated LLM server with a prefix cache, for moonserve's process deployments.

Python 3.9+ standard library only. It speaks the OpenAI chat shape (POST /v1/chat/completions,
streamed as SSE or whole) and does no real inference: it only keeps the timing a GPU server
with a KV prefix cache would have, so that routing decisions show up in time to first token.

The model of one replica (one simulated GPU):

* The prompt is the concatenation of the messages ("role: content\\n" each). It is cut into
  blocks of BLOCK_CHARS characters; only full blocks are cached, and block i's key hashes block
  i's text together with block i-1's key, so a key stands for the whole prefix up to it (as
  vLLM's block hashing does).
* The cache is an LRU of CACHE_BLOCKS keys. A request's hit is the number of leading blocks
  whose keys are cached (a hit must start at the first block: a later block alone is useless).
* Time to first token = BASE_MS + BLOCK_MS x (prompt blocks not hit): the prefill of what
  was not cached. Then max_tokens tokens come out, one every TOKEN_MS.
* SLOTS requests run at once; the others wait for a slot (that wait is part of their time to
  first token), so an overloaded replica is visible.

Defaults (each has an environment variable and a flag): 64-character blocks, 2 ms + 1 ms per
uncached block, 1 ms per token, 16 tokens, 512 cached blocks, 4 slots. A 2,000-character
prompt costs ~33 ms cold and ~2 ms when all cached: large enough to measure over loopback,
small enough for a benchmark of a few seconds.

Where to listen: --socket PATH or MOONSERVE_SOCKET (a Unix socket), else --port N or PORT (TCP on
127.0.0.1); the engine sets one of the two variables.

Each answer carries what the bench needs: headers x-prompt-blocks, x-prefix-cache-hit-blocks,
x-queue-ms and x-replica-id (MOONSERVE_REPLICA_ID), and an OpenAI-style usage object (in the
completion, or in the last chunk when streaming) with prompt_tokens_details.cached_tokens
counted in characters.
"""

import argparse
import collections
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch "
         "from old oak trees").split()


class PrefixCache:
    """LRU of block keys; thread-safe."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.keys = collections.OrderedDict()
        self.lock = threading.Lock()

    def hit_blocks(self, keys):
        """How many leading keys are cached; refreshes them (they are in use again)."""
        with self.lock:
            n = 0
            while n < len(keys) and keys[n] in self.keys:
                n += 1
            self._touch(keys[:n])
            return n

    def insert(self, keys):
        with self.lock:
            self._touch(keys)
            while len(self.keys) > self.capacity:
                self.keys.popitem(last=False)

    def _touch(self, keys):
        # Most recent last; a prompt's first blocks go in last so that eviction takes its tail
        # first and the reusable head stays.
        for k in reversed(keys):
            self.keys[k] = True
            self.keys.move_to_end(k)


class Model:
    def __init__(self, opts):
        self.opts = opts
        self.cache = PrefixCache(opts.cache_blocks)
        self.slots = threading.Semaphore(opts.slots)
        self.replica_id = os.environ.get("MOONSERVE_REPLICA_ID", str(os.getpid()))

    def block_keys(self, prompt):
        size = self.opts.block_chars
        keys, prev = [], None
        for i in range(0, len(prompt) - size + 1, size):
            prev = hash((prev, prompt[i:i + size]))
            keys.append(prev)
        return keys


def prompt_of(request):
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs a string content")
        parts.append("%s: %s\n" % (m.get("role", "user"), m["content"]))
    return "".join(parts)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llm-sim/1"

    def setup(self):
        super().setup()
        if self.connection.family == socket.AF_INET:
            # headers and the first chunk are separate small writes: without this, Nagle's
            # algorithm holds the chunk for the peer's delayed ACK (~40 ms of fake TTFT)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        pass  # a log line per request would cost more than the simulated work

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"error": "not found"})
            return
        try:
            request = json.loads(body)
            prompt = prompt_of(request)
            max_tokens = int(request.get("max_tokens") or self.server.model.opts.max_tokens)
        except (ValueError, TypeError) as e:
            self.send_json(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
            return
        model = self.server.model
        keys = model.block_keys(prompt)
        queued = time.monotonic()
        with model.slots:
            hit = model.cache.hit_blocks(keys)
            info = {
                "x-prompt-blocks": str(len(keys)),
                "x-prefix-cache-hit-blocks": str(hit),
                "x-queue-ms": "%.2f" % ((time.monotonic() - queued) * 1000),
                "x-replica-id": model.replica_id,
            }
            opts = model.opts
            prefill_s = (opts.base_ms + opts.block_ms * (len(keys) - hit)) / 1000.0
            usage = {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                     "total_tokens": len(prompt) + max_tokens,
                     "prompt_tokens_details": {"cached_tokens": hit * opts.block_chars}}
            answer = Answer(request.get("model") or "sim", max_tokens, usage)
            if request.get("stream"):
                self.stream(answer, info, prefill_s, keys)
            else:
                time.sleep(prefill_s + max_tokens * opts.token_ms / 1000.0)
                model.cache.insert(keys)
                self.send_json(200, answer.completion(), info)

    def stream(self, answer, info, prefill_s, keys):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in info.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()
        time.sleep(prefill_s)
        self.server.model.cache.insert(keys)
        gap = self.server.model.opts.token_ms / 1000.0
        try:
            for i in range(answer.max_tokens):
                if i:
                    time.sleep(gap)
                self.send_event(answer.chunk(i))
            self.send_event(answer.final_chunk())
            self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the caller left: stop generating, free the slot

    def send_event(self, obj):
        self.write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_json(self, status, obj, extra=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class Answer:
    """The generated tokens (fixed words) in the OpenAI completion and chunk shapes."""

    def __init__(self, model, max_tokens, usage):
        self.model, self.max_tokens, self.usage = model, max_tokens, usage
        self.id = "chatcmpl-%d-%d" % (os.getpid(), time.monotonic_ns())
        self.created = int(time.time())

    def token(self, i):
        return WORDS[i % len(WORDS)] + " "

    def chunk(self, i):
        delta = {"content": self.token(i)}
        if i == 0:
            delta["role"] = "assistant"
        return self._chunk({"index": 0, "delta": delta, "finish_reason": None})

    def final_chunk(self):
        out = self._chunk({"index": 0, "delta": {}, "finish_reason": "length"})
        out["usage"] = self.usage
        return out

    def _chunk(self, choice):
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [choice]}

    def completion(self):
        text = "".join(self.token(i) for i in range(self.max_tokens))
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": text}}],
                "usage": self.usage}


class TCPServer(ThreadingHTTPServer):
    daemon_threads = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)  # the handler expects a (host, port) client address


def env_num(name, default, kind=int):
    return kind(os.environ.get(name) or default)


def parse_args(argv):
    p = argparse.ArgumentParser(description="simulated LLM server with a prefix cache")
    p.add_argument("--socket", default=os.environ.get("MOONSERVE_SOCKET"))
    p.add_argument("--port", type=int, default=env_num("PORT", 0))
    p.add_argument("--block-chars", type=int, default=env_num("LLM_BLOCK_CHARS", 64))
    p.add_argument("--cache-blocks", type=int, default=env_num("LLM_CACHE_BLOCKS", 512))
    p.add_argument("--slots", type=int, default=env_num("LLM_SLOTS", 4))
    p.add_argument("--base-ms", type=float, default=env_num("LLM_BASE_MS", 2.0, float))
    p.add_argument("--block-ms", type=float, default=env_num("LLM_BLOCK_MS", 1.0, float))
    p.add_argument("--token-ms", type=float, default=env_num("LLM_TOKEN_MS", 1.0, float))
    p.add_argument("--max-tokens", type=int, default=env_num("LLM_MAX_TOKENS", 16))
    opts = p.parse_args(argv)
    if not opts.socket and not opts.port:
        p.error("nowhere to listen: give --socket/MOONSERVE_SOCKET or --port/PORT")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if opts.socket:
        if os.path.exists(opts.socket):
            os.unlink(opts.socket)  # a stale socket from an earlier run
        server = UnixServer(opts.socket, Handler)
    else:
        server = TCPServer(("127.0.0.1", opts.port), Handler)
    server.model = Model(opts)
    # SIGTERM (the engine's stop) ends serve_forever through SystemExit, so the socket is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if opts.socket and os.path.exists(opts.socket):
            os.unlink(opts.socket)


if __name__ == "__main__":
    main()
