"""examples/digits end to end: the example's app.lua (its weights.safetensors, read relative to
the app file, through serve.nn) answers every held-out image of test.json over HTTP with at
least 95% accuracy; a check deployment using require "moonserve.nn" directly gets identical
labels (the same ones HTTP gave) from batches of 1 and of 32, and the same scores to float
rounding; bad bodies get a 400 with a JSON message and the request id; a model file the runtime
refuses makes the constructor fail with the loader's message."""

import json
import os
import unittest

import harness

DIGITS = os.path.join(harness.SOURCE_DIR, "examples", "digits")

with open(os.path.join(DIGITS, "test.json")) as f:
    IMAGES = json.load(f)

# Runs the held-out images through the model in batches of 1 and of 32 inside a replica.
CHECK_LUA = r"""
local serve = require "moonserve"
local nn = require "moonserve.nn"

local Check = serve.deployment { name = "Check" }

function Check:init(dir)
    self.model = nn.load(dir .. "/weights.safetensors", { device = "auto" })
    local f = assert(io.open(dir .. "/test.json"))
    self.images = serve.json.decode(f:read("*a"))
    f:close()
end

local function batches(model, rows, size)
    local labels, scores = {}, {}
    for first = 1, #rows, size do
        local chunk = {}
        for i = first, math.min(first + size - 1, #rows) do
            chunk[#chunk + 1] = rows[i]
        end
        for _, l in ipairs(model:predict(chunk)) do labels[#labels + 1] = l end
        for _, s in ipairs(model:forward(chunk)) do scores[#scores + 1] = s end
    end
    return labels, scores
end

function Check:__call(req)
    local rows = {}
    for i, im in ipairs(self.images) do rows[i] = im.pixels end
    local l1, s1 = batches(self.model, rows, 1)
    local l32, s32 = batches(self.model, rows, 32)
    local max_diff = 0
    for i = 1, #s1 do
        for c = 1, #s1[i] do
            max_diff = math.max(max_diff, math.abs(s1[i][c] - s32[i][c]))
        end
    end
    return { batch1 = l1, batch32 = l32, max_score_diff = max_diff, info = self.model:info() }
end

return { app = function(args) return Check:bind(args.dir) end }
"""


class DigitsTest(harness.ServerTestCase):
    APPLICATIONS = [
        {"name": "digits", "route_prefix": "/digits",
         "import_path": os.path.join(DIGITS, "app.lua") + ":app"},
        {"name": "check", "route_prefix": "/check", "import_path": "check.lua:app",
         "args": {"dir": DIGITS}},
    ]
    FILES = {"check.lua": CHECK_LUA}

    def classify(self, pixels):
        r = self.server.request("POST", "/digits", body=json.dumps({"pixels": pixels}),
                                headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 200, r)
        return r.json()["label"]

    def http_labels(self):
        results = harness.run_threads(
            lambda chunk: [self.classify(im["pixels"]) for im in chunk],
            [(IMAGES[i::8],) for i in range(8)], timeout=120)
        labels = [None] * len(IMAGES)
        for i, (res, exc) in enumerate(results):
            self.assertIsNone(exc, exc)
            labels[i::8] = res
        return labels

    def test_accuracy_over_http(self):
        self.assertGreaterEqual(len(IMAGES), 300)
        labels = self.http_labels()
        correct = sum(1 for im, l in zip(IMAGES, labels) if l == im["label"])
        accuracy = correct / len(IMAGES)
        self.assertGreaterEqual(accuracy, 0.95, "%d of %d right" % (correct, len(IMAGES)))
        self.assertTrue(all(isinstance(l, int) and 0 <= l <= 9 for l in labels), labels)

    def test_batch_sizes_give_identical_labels(self):
        r = self.server.get("/check", timeout=60)
        self.assertEqual(r.status, 200, r)
        doc = r.json()
        self.assertEqual(len(doc["batch1"]), len(IMAGES))
        self.assertEqual(doc["batch1"], doc["batch32"])
        self.assertLess(doc["max_score_diff"], 1e-5, doc["max_score_diff"])
        info = doc["info"]
        self.assertEqual((info["input"], info["output"]), (64, 10), info)
        self.assertEqual([(l["input"], l["output"]) for l in info["layers"]],
                         [(64, 32), (32, 10)], info)
        self.assertEqual((info["activation"], info["output_activation"]), ("relu", "softmax"))
        # The HTTP path runs the same model: the same labels, image by image.
        self.assertEqual(self.http_labels(), doc["batch1"])

    def test_bad_bodies(self):
        cases = [
            (b"not json", "expected a JSON body"),
            (b'{"pixels": 5}', "expected a JSON body"),
            (json.dumps({"pixels": [0] * 63}).encode(), "pixels has 63 values, the model takes 64"),
            (json.dumps({"pixels": [0] * 63 + ["x"]}).encode(), "pixels[64] is a string"),
        ]
        for body, message in cases:
            r = self.server.request("POST", "/digits", body=body)
            err = self.assertErrorJSON(r, 400)
            self.assertIn(message, err["error"], r)
        self.assertErrorJSON(self.server.get("/digits"), 400)


class BrokenWeightsTest(unittest.TestCase):
    """A truncated weights file: the replica's constructor fails with the loader's message."""

    def test_constructor_error(self):
        with open(os.path.join(DIGITS, "app.lua")) as f:
            app = f.read()
        srv = harness.Server(
            [{"name": "digits", "route_prefix": "/", "import_path": "digits/app.lua:app"}],
            files={"digits/app.lua": app})
        self.addCleanup(srv.cleanup)
        with open(os.path.join(DIGITS, "weights.safetensors"), "rb") as f:
            data = f.read()
        with open(os.path.join(srv.dir, "digits", "weights.safetensors"), "wb") as f:
            f.write(data[:len(data) // 2])
        srv.start()

        def failed():
            r = srv.get("/", timeout=10)
            return r if r.status == 503 and b"weights.safetensors" in r.body else None
        r = harness.wait_until(failed, 20, 0.2)
        self.assertTrue(r, srv.stderr_tail())
        self.assertIn(b"nn.load: ", r.body, r)
        self.assertIn(b"are outside the", r.body, r)
        srv.stop()


if __name__ == "__main__":
    harness.main()
