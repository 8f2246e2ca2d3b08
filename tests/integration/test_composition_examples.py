"""The composition examples do what their files say (docs/lua-api.md; each example's header):

- examples/fanout (Ray Serve's advanced-autoscaling Driver / HeavyLoad / LightLoad): the Driver
  answers ["heavy", "light"], and under concurrent load the autoscaler adds HeavyLoad replicas,
  within its max_replicas.
- examples/pipeline (Pipeline(Preprocessor, Model)): text in, the Model's verdict on its tokens
  out, with the Model's user_config from the YAML.
- examples/streaming: the tokens arrive as SSE events, ended by a "done" event.
- examples/multiplexed: the customer's model answers, a customer's requests stay on the replica
  that loaded its model, and a request without a model id is a 400.
"""

import json
import unittest

import harness
from harness import LoadGen, wait_until
from test_examples_run import ExampleServer


class ExampleCase(harness.ServerTestCase):
    EXAMPLE = None

    @classmethod
    def make_server(cls):
        return ExampleServer(cls.EXAMPLE)

    def ok(self, method, path, body=None, headers=None, timeout=20):
        r = self.server.request(method, path, body=body, headers=headers, timeout=timeout)
        self.assertEqual(r.status, 200, r)
        return r


class FanoutExampleTest(ExampleCase):
    EXAMPLE = "fanout"

    def test_driver_answers_both(self):
        self.assertEqual(self.ok("POST", "/").json(), ["heavy", "light"])

    def test_heavy_load_scales_up_under_load(self):
        with LoadGen(self.server, "/", 8, timeout=30) as load:
            grew = wait_until(lambda: (self.server.deployment_status("default", "HeavyLoad")
                                       .get("target_num_replicas") or 0) > 1, 30, 0.2)
        self.assertTrue(grew, self.server.deployment_status("default", "HeavyLoad"))
        self.assertEqual(load.failures, [], load.failures[:3])
        for name in ("HeavyLoad", "LightLoad"):
            target = self.server.deployment_status("default", name).get("target_num_replicas")
            self.assertLessEqual(target, 4, name)


class PipelineExampleTest(ExampleCase):
    EXAMPLE = "pipeline"

    def test_text_through_both_steps(self):
        got = self.ok("POST", "/pipeline", body=b"What a GREAT day, I love it").json()
        self.assertEqual(got, {"tokens": 7, "positive": 2, "label": "positive"})
        got = self.ok("POST", "/pipeline", body=b"just a day").json()
        self.assertEqual(got, {"tokens": 3, "positive": 0, "label": "neutral"})


class StreamingExampleTest(ExampleCase):
    EXAMPLE = "streaming"

    def test_tokens_as_server_sent_events(self):
        r = self.ok("GET", "/generate?prompt=one+two&max_tokens=3")
        self.assertTrue(r.header("content-type").startswith("text/event-stream"), r)
        self.assertTrue(r.chunked, r)
        events = [e for e in r.body.decode().split("\n\n") if e]
        self.assertEqual(events[0], ": generating 3 tokens")
        self.assertEqual(events[1:4], ["event: token\nid: 1\ndata: one",
                                       "event: token\nid: 2\ndata: two",
                                       "event: token\nid: 3\ndata: eno"])
        self.assertEqual(events[4], 'event: done\ndata: {"tokens":3}')


class MultiplexedExampleTest(ExampleCase):
    EXAMPLE = "multiplexed"

    def predict(self, customer, features):
        return self.ok("POST", "/predict", body=json.dumps(features).encode(),
                       headers={"serve_multiplexed_model_id": customer}).json()

    def test_customer_models_and_affinity(self):
        first = self.predict("customer-7", [1, 2, 3])
        self.assertEqual(first["model"], "customer-7")
        for _ in range(10):
            again = self.predict("customer-7", [1, 2, 3])
            self.assertEqual((again["replica"], again["score"]),
                             (first["replica"], first["score"]))
        self.assertNotEqual(self.predict("customer-8", [1, 2, 3])["score"], first["score"])

    def test_no_model_id_is_a_400(self):
        r = self.server.request("POST", "/predict", body=b"[1]")
        self.assertEqual(r.status, 400, r)
        self.assertIn("serve_multiplexed_model_id", r.json()["error"])


if __name__ == "__main__":
    harness.main()
