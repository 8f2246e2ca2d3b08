#!/usr/bin/python3
"""The torch classifier as an HTTP/1.1 keep-alive server: what a moonserve process replica runs.

Listens on the Unix socket $MOONSERVE_SOCKET when set (the engine's default, listen: unix), else
on TCP 127.0.0.1:$PORT. Loads weights.pt once, before listening, so a replica is ready (GET
/healthz answers 200) only once the model is loaded.

  GET  /healthz         200 {"status": "ok"}
  POST /predict         {"image": [64 numbers 0..16]} -> {"label": n, "probabilities": [10]}
  POST /                the same as /predict: a Lua handle call with a table body posts to /
  POST /predict_batch   a JSON array of /predict bodies -> a JSON array of answers, in order,
                        from one forward pass (the engine's process batching shape)

Bad input answers 400 {"error": "..."}. SIGTERM (or SIGINT) stops it cleanly.
"""
import http.server
import json
import os
import signal
import socketserver
import sys
import threading

import torch

from model import INPUTS, DigitsMLP

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY_BYTES = 4 << 20


class BadInput(Exception):
    pass


def load_model():
    torch.set_num_threads(1)  # replicas are scaled by the engine, not by torch's thread pool
    model = DigitsMLP()
    model.load_state_dict(torch.load(os.path.join(HERE, "weights.pt")))
    model.eval()
    return model


def image_of(item, where):
    if not isinstance(item, dict) or not isinstance(item.get("image"), list):
        raise BadInput('%s: expected {"image": [%d numbers]}' % (where, INPUTS))
    image = item["image"]
    if len(image) != INPUTS:
        raise BadInput("%s: image has %d values, expected %d" % (where, len(image), INPUTS))
    for i, v in enumerate(image):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 16:
            raise BadInput("%s: image[%d] is %r, not a number in 0..16" % (where, i, v))
    return image


def predict(model, images):
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor(images, dtype=torch.float32)), dim=1)
    return [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probs]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the engine pools connections to replicas

    def address_string(self):
        return str(self.client_address or "unix")  # a Unix socket peer has no host

    def log_message(self, fmt, *args):
        pass  # one line per request would flood the engine's log

    def send_json(self, status, value, close=False):
        data = json.dumps(value).encode()
        self.send_response(status)
        if close:  # its body may be partly unread: the connection cannot carry another request
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadInput("bad Content-Length")
        if n < 0 or n > MAX_BODY_BYTES:
            raise BadInput("body of %d bytes: at most %d" % (n, MAX_BODY_BYTES))
        return self.rfile.read(n)

    def read_chunked(self):
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise BadInput("body over %d bytes" % MAX_BODY_BYTES)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def do_GET(self):
        if self.path == "/healthz":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, {"error": "no route GET %s" % self.path})

    def do_POST(self):
        if self.path not in ("/", "/predict", "/predict_batch"):
            self.send_json(404, {"error": "no route POST %s" % self.path}, close=True)
            return
        try:
            try:
                body = json.loads(self.read_body())
            except ValueError as e:
                raise BadInput("body is not JSON: %s" % e)
            if self.path == "/predict_batch":
                if not isinstance(body, list):
                    raise BadInput("expected a JSON array of {\"image\": [...]} bodies")
                images = [image_of(item, "item %d" % i) for i, item in enumerate(body)]
                self.send_json(200, predict(self.server.model, images) if images else [])
            else:
                self.send_json(200, predict(self.server.model, [image_of(body, "body")])[0])
        except BadInput as e:
            self.send_json(400, {"error": str(e)}, close=True)


class TCPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def make_server():
    path = os.environ.get("MOONSERVE_SOCKET")
    if path:
        if os.path.exists(path):
            os.unlink(path)  # a socket left by an earlier replica at this path
        return UnixServer(path, Handler), "unix:" + path
    port = int(os.environ.get("PORT", "8000"))
    return TCPServer(("127.0.0.1", port), Handler), "http://127.0.0.1:%d" % port


def main():
    model = load_model()
    server, where = make_server()
    server.model = model

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, which runs in this (main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    print("torch-classifier: model loaded (torch %s), listening on %s (replica %s)"
          % (torch.__version__, where, os.environ.get("MOONSERVE_REPLICA_ID", "-")),
          file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()
    if isinstance(server, UnixServer):
        os.unlink(server.server_address)


if __name__ == "__main__":
    main()
