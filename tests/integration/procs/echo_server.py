"""A small HTTP/1.1 server for process-replica tests (stdlib only).

Listens where moonserve says (MOONSERVE_SOCKET, or PORT on 127.0.0.1). Behaviour is chosen by the
request path:
  GET  /health             200 unless the file named by env FAIL_HEALTH_FILE exists
  ANY  /echo...            200 JSON: method, path, headers, body length, sha256, replica env
  GET  /stream?n=K         chunked: K lines, one per ~10 ms, flushed one by one
  GET  /sse?n=K            text/event-stream with K events then a comment
  GET  /slow?s=SECONDS     sleeps, appending to env SIDE_EFFECT_FILE while it does (per 50 ms)
  GET  /status/CODE        answers that status with a JSON body
  ANY  /sink               reads the body piece by piece (never whole): JSON length and sha256
  GET  /wait?file=PATH      answers once PATH exists; prints "wait NAME: started" and, when the
                           engine closes the connection first, "wait NAME: client went away"
  POST /batch              a batch (process.batch): a JSON array of items; answers one result per
                           item ({"y": 2*x, "batch_size", "header", "item"}). Items may ask for
                           {"fail": true} (the batch answers 500), {"short": true} (one result
                           too few) or {"wait_for": PATH} (answer once PATH exists). Each batch
                           is appended as a JSON line to the file named by env BATCH_LOG_FILE
  GET  /big?mb=N           N MiB with a Content-Length, written in 64 KiB pieces; the bytes
                           written so far go to the file named by env PROGRESS_FILE
Env: READY_DELAY_S delays the start of listening; EXIT_AT_START=N exits with status N at once.
"""
import hashlib
import http.server
import json
import os
import select
import socket
import socketserver
import sys
import time
import urllib.parse


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(n) if n else b""

    def pieces(self):
        """The body in pieces as they arrive (Content-Length or chunked), never held whole."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return
                while size:
                    piece = self.rfile.read(min(size, 1 << 16))
                    size -= len(piece)
                    yield piece
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            piece = self.rfile.read(min(left, 1 << 16))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def sink(self):
        h, n = hashlib.sha256(), 0
        for piece in self.pieces():
            h.update(piece)
            n += len(piece)
        self.send_json(200, {"body_len": n, "body_sha256": h.hexdigest(),
                             "chunked": "Transfer-Encoding" in self.headers})

    def big(self, mib):
        progress = os.environ.get("PROGRESS_FILE")
        piece = bytes(range(256)) * 256
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(mib << 20))
        self.end_headers()
        for i in range(mib * 16):
            self.wfile.write(piece)
            if progress and i % 16 == 15:
                with open(progress + ".tmp", "w") as f:
                    f.write(str((i + 1) * len(piece)))
                os.replace(progress + ".tmp", progress)

    def wait(self, path):
        name = os.path.basename(path)
        print("wait %s: started" % name, flush=True)
        while not os.path.exists(path):
            ready, _, _ = select.select([self.connection], [], [], 0.02)
            if ready and not self.connection.recv(1, socket.MSG_PEEK):
                print("wait %s: client went away" % name, flush=True)
                self.close_connection = True
                return
        self.send_json(200, {"waited": name})

    def batch(self, items):
        log = os.environ.get("BATCH_LOG_FILE")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(items) + "\n")
        asks = [it if isinstance(it, dict) else {} for it in items]
        for ask in asks:
            until = time.time() + 20
            while ask.get("wait_for") and not os.path.exists(ask["wait_for"]) and \
                    time.time() < until:
                time.sleep(0.01)
        if any(ask.get("fail") for ask in asks):
            return self.send_json(500, {"error": "failed as asked"})
        results = [{"y": 2 * ask["x"] if "x" in ask else None, "batch_size": len(items),
                    "header": self.headers.get("X-Moonserve-Batch-Size"), "item": it}
                   for ask, it in zip(asks, items)]
        if any(ask.get("short") for ask in asks):
            results.pop()
        self.send_json(200, results)

    def send_json(self, status, obj, extra=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/sink":
            return self.sink()
        if url.path == "/big":
            return self.big(int(q.get("mb", "1")))
        data = self.body()
        if url.path == "/batch":
            return self.batch(json.loads(data))
        if url.path == "/wait":
            return self.wait(q["file"])
        if url.path == "/health":
            bad = os.environ.get("FAIL_HEALTH_FILE")
            if bad and os.path.exists(bad):
                return self.send_json(503, {"ok": False})
            return self.send_json(200, {"ok": True})
        if url.path.startswith("/status/"):
            return self.send_json(int(url.path[8:]), {"status": int(url.path[8:])})
        if url.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", 3))):
                line = ("line %d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(int(q.get("n", 3))):
                ev = ("id: %d\nevent: tick\ndata: {\"i\": %d}\n\n" % (i, i)).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
                time.sleep(0.01)
            end = b": done\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
            return
        if url.path == "/slow":
            until = time.time() + float(q.get("s", "5"))
            path = os.environ.get("SIDE_EFFECT_FILE")
            while time.time() < until:
                if path:
                    with open(path, "a") as f:
                        f.write("x")
                time.sleep(0.05)
            return self.send_json(200, {"slept": True})
        self.conn_requests = getattr(self, "conn_requests", 0) + 1
        self.send_json(200, {
            "conn_requests": self.conn_requests,
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(data),
            "body_sha256": hashlib.sha256(data).hexdigest(),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith("MOONSERVE_") or k in ("PORT", "CUDA_VISIBLE_DEVICES", "EXTRA")},
            "cwd": os.getcwd(),
            "pid": os.getpid(),
        }, extra=[("X-Upstream", "echo"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        sock, _ = super().get_request()
        return sock, ("local", 0)


class TcpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def main():
    if os.environ.get("EXIT_AT_START"):
        print("exiting at start as asked", file=sys.stderr, flush=True)
        sys.exit(int(os.environ["EXIT_AT_START"]))
    time.sleep(float(os.environ.get("READY_DELAY_S", "0")))
    sock = os.environ.get("MOONSERVE_SOCKET")
    if sock:
        srv = UnixServer(sock, Handler)
    else:
        srv = TcpServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    print("echo server %s listening" % os.environ.get("MOONSERVE_REPLICA_ID"), flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
