"""examples/torch-classifier: a PyTorch model as process replicas behind a validating Lua ingress.

server.py alone, on a temporary Unix socket: /healthz, /predict and the batch shape of
/predict_batch (a JSON array in, an answer per item out, in order), and 400 on bad input. Then
the example's own serve.yaml (in a copy of the folder, on free ports): every image of test.json is
classified over HTTP with at least 90% accuracy, and bad bodies get a 422 from the Lua ingress
that names the problem, without reaching a replica. Skipped when /usr/bin/python3 has no torch."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import unittest

import harness

EXAMPLE = os.path.join(harness.SOURCE_DIR, "examples", "torch-classifier")
PYTHON = "/usr/bin/python3"


def torch_missing():
    try:
        r = subprocess.run([PYTHON, "-c", "import torch"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "%s cannot run: %s" % (PYTHON, e)
    return None if r.returncode == 0 else "%s cannot import torch" % PYTHON


SKIP = torch_missing()

with open(os.path.join(EXAMPLE, "test.json")) as f:
    IMAGES = json.load(f)



@unittest.skipIf(SKIP, SKIP)
class ServerAloneTest(unittest.TestCase):
    """server.py started by the test, spoken to over its Unix socket with keep-alive."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="torch-example-")
        cls.sock_path = os.path.join(cls.tmp.name, "replica.sock")
        cls.log = open(os.path.join(cls.tmp.name, "stderr.log"), "w+")
        env = dict(os.environ, MOONSERVE_SOCKET=cls.sock_path)
        cls.proc = subprocess.Popen([PYTHON, os.path.join(EXAMPLE, "server.py")], env=env,
                                    stdin=subprocess.DEVNULL, stdout=cls.log, stderr=cls.log)
        ready = harness.wait_until(lambda: cls.proc.poll() is not None or cls.connect(), 60, 0.1)
        if cls.proc.poll() is not None or not ready:
            cls.stop_server()
            raise AssertionError("server.py did not listen; its log:\n" + cls.log_text())
        cls.sock = ready
        cls.reader = harness.HTTPReader(cls.sock)

    @classmethod
    def connect(cls):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(cls.sock_path)
        except OSError:
            s.close()
            return None
        s.settimeout(30)
        return s

    @classmethod
    def log_text(cls):
        cls.log.seek(0)
        return cls.log.read()

    @classmethod
    def stop_server(cls):
        if cls.proc.poll() is None:
            cls.proc.terminate()
        try:
            cls.proc.wait(15)
        except subprocess.TimeoutExpired:
            cls.proc.kill()
            cls.proc.wait(5)
        cls.log.close()
        cls.tmp.cleanup()

    @classmethod
    def tearDownClass(cls):
        cls.sock.close()
        cls.proc.terminate()
        rc = cls.proc.wait(15)
        gone = not os.path.exists(cls.sock_path)
        log = cls.log_text()
        cls.stop_server()
        assert rc == 0, "server.py exited %r on SIGTERM; log:\n%s" % (rc, log)
        assert gone, "server.py left its socket behind"

    def call(self, method, path, value=None, raw=None):
        """One request on the shared keep-alive connection (a fresh one after a close)."""
        body = raw if raw is not None else (None if value is None else json.dumps(value))
        headers = {"Content-Type": "application/json"} if body is not None else None
        self.sock.sendall(harness.build_request(method, path, headers, body))
        r = self.reader.read_response()
        if r.header("connection", "").lower() == "close":
            self.sock.close()
            type(self).sock = self.connect()
            type(self).reader = harness.HTTPReader(self.sock)
        return r

    def test_started_line(self):
        self.assertIn("torch-classifier: model loaded", self.log_text())
        self.assertIn(self.sock_path, self.log_text())

    def test_healthz(self):
        r = self.call("GET", "/healthz")
        self.assertEqual(r.status, 200, r)

    def test_predict(self):
        for path in ("/predict", "/"):
            r = self.call("POST", path, {"image": IMAGES[0]["image"]})
            self.assertEqual(r.status, 200, r)
            doc = r.json()
            self.assertEqual(doc["label"], IMAGES[0]["label"], doc)
            self.assertEqual(len(doc["probabilities"]), 10)
            self.assertAlmostEqual(sum(doc["probabilities"]), 1.0, places=4)

    def test_batch_shape(self):
        items = [{"image": im["image"]} for im in IMAGES[:7]]
        r = self.call("POST", "/predict_batch", items)
        self.assertEqual(r.status, 200, r)
        answers = r.json()
        self.assertIsInstance(answers, list)
        self.assertEqual(len(answers), len(items))
        for item, answer in zip(items, answers):
            one = self.call("POST", "/predict", item).json()
            self.assertEqual(answer["label"], one["label"])
            for a, b in zip(answer["probabilities"], one["probabilities"]):
                self.assertAlmostEqual(a, b, places=5)
        self.assertEqual(self.call("POST", "/predict_batch", []).json(), [])

    def test_bad_input_400(self):
        cases = [
            ("/predict", b"not json", "not JSON"),
            ("/predict", json.dumps({"image": [0] * 63}).encode(), "63 values"),
            ("/predict", json.dumps({"image": [0] * 63 + [17]}).encode(), "image[63]"),
            ("/predict_batch", json.dumps({"image": [0] * 64}).encode(), "JSON array"),
            ("/predict_batch", json.dumps([{"image": [0] * 64}, {}]).encode(), "item 1"),
        ]
        for path, body, message in cases:
            r = self.call("POST", path, raw=body)
            self.assertEqual(r.status, 400, r)
            self.assertIn(message, r.json()["error"], r)


class ExampleServer(harness.Server):
    """The example's serve.yaml, run from a copy of the folder with free ports put in."""

    def __init__(self):
        super().__init__([], shutdown_timeout_s=20.0)

    def _write_config(self):
        root = os.path.join(self.dir, "torch-classifier")
        if not os.path.isdir(root):
            shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns("__pycache__"))
        self.config_path = os.path.join(root, "serve.yaml")
        with open(os.path.join(EXAMPLE, "serve.yaml")) as f:
            text = f.read()
        self.port = harness.free_port(self.host)
        self.admin_port = harness.free_port(self.host)
        self.admin_token = None
        text, n = re.subn(r"^(\s+port:\s*)\d+", r"\g<1>%d" % self.port, text, count=1, flags=re.M)
        assert n == 1, "no http_options.port in serve.yaml"
        text += "\nadmin:\n  host: 127.0.0.1\n  port: %d\n" % self.admin_port
        with open(self.config_path, "w") as f:
            f.write(text)


@unittest.skipIf(SKIP, SKIP)
class EndToEndTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = ExampleServer()
        try:
            cls.server.start()
            cls.server.wait_status("torch-classifier", "Classifier",
                                   lambda d: len([r for r in d.get("replicas") or []
                                                  if r.get("state") == "RUNNING"]) == 2,
                                   timeout=90, what="2 RUNNING replicas")
        except BaseException:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
        finally:
            cls.server.cleanup()

    def post(self, body):
        return self.server.request("POST", "/", body=body,
                                   headers={"Content-Type": "application/json"}, timeout=30)

    def test_accuracy(self):
        def classify(chunk):
            out = []
            for im in chunk:
                r = self.post(json.dumps({"image": im["image"]}))
                self.assertEqual(r.status, 200, r)
                out.append(r.json()["label"])
            return out
        results = harness.run_threads(classify, [(IMAGES[i::4],) for i in range(4)], timeout=120)
        labels = [None] * len(IMAGES)
        for i, (res, exc) in enumerate(results):
            self.assertIsNone(exc, exc)
            labels[i::4] = res
        correct = sum(1 for im, l in zip(IMAGES, labels) if l == im["label"])
        self.assertGreaterEqual(correct / len(IMAGES), 0.90, "%d of %d" % (correct, len(IMAGES)))

    def test_invalid_input_422_from_ingress(self):
        good = IMAGES[0]["image"]
        cases = [
            (b"not json", "not JSON"),
            (b"[1, 2]", "JSON object"),
            (json.dumps({"pixels": good}).encode(), '"image" must be an array'),
            (json.dumps({"image": {"a": 1}}).encode(), '"image" must be an array'),
            (json.dumps({"image": good[:63]}).encode(), '"image" has 63 values, expected 64'),
            (json.dumps({"image": good[:63] + ["x"]}).encode(), "image[63] is not a number"),
            (json.dumps({"image": good[:63] + [16.5]}).encode(), "image[63] is 16.5, outside"),
            (json.dumps({"image": [-1] + good[1:]}).encode(), "image[0] is -1, outside"),
        ]
        for body, message in cases:
            r = self.post(body)
            self.assertEqual(r.status, 422, r)
            err = r.json()
            self.assertIn(message, err["error"], r)
            self.assertEqual(err.get("request_id"), r.header("x-request-id"), r)
        # 422 itself says the ingress answered: had a body reached server.py, its 400 would have
        # made the handle call fail and the ingress answer 500.

    def test_replicas_logged_start(self):
        log = self.server.stderr_text()
        self.assertEqual(log.count("torch-classifier: model loaded"), 2, log[-3000:])


if __name__ == "__main__":
    harness.main()
