"""GPU placement in fake-GPU mode (docs/gpu.md): MOONSERVE_FAKE_GPUS describes the devices.
Replicas with ray_actor_options.num_gpus are packed onto devices without over-commit (4 x 0.25
fill one device), each replica sees only its own device (CUDA_VISIBLE_DEVICES) and learns it in
its replica context (gpu_ids); a replica that does not fit stays pending and status says why;
stopping a replica frees its share for a pending one; CPU replicas on a GPU host see no GPU;
GPU metrics reach /metrics and the autoscaling policies' ctx (the shipped GPU-utilization
policy scales on them); a bad num_gpus is a config error; a bad fake spec stops the start."""

import json
import os
import unittest

import harness
from harness import run_cli

GPU_LUA = r'''
local serve = require "moonserve"
local G = serve.deployment { name = "G" }
function G:__call(req)
  local ctx = serve.get_replica_context()
  local f = io.open("/proc/self/environ", "rb")
  local env = f:read("*a"); f:close()
  local visible = env:match("CUDA_VISIBLE_DEVICES=([^%z]*)")
  return { gpu_ids = serve.json.array(ctx.gpu_ids), visible = visible or serve.json.null,
           replica = ctx.replica_tag }
end
return { app = G:bind() }
'''


def gpu_app(name, num_gpus, replicas, **deployment):
    d = {"name": "G", "num_replicas": replicas, "graceful_shutdown_wait_loop_s": 0.1,
         "graceful_shutdown_timeout_s": 2}
    if num_gpus is not None:
        d["ray_actor_options"] = {"num_gpus": num_gpus}
    d.update(deployment)
    return {"name": name, "route_prefix": "/" + name, "import_path": "gpu.lua:app",
            "deployments": [d]}


def replicas(server, app):
    return server.deployment_status(app, "G").get("replicas") or []


class GpuPlacementTest(harness.ServerTestCase):
    ENV = {"MOONSERVE_FAKE_GPUS": "2xA100:81920"}
    FILES = {"gpu.lua": GPU_LUA}
    APPLICATIONS = [
        gpu_app("quarter", 0.25, 4),  # fills device 0 or 1 exactly
        gpu_app("half", 0.5, 3),      # two fit on what the quarters leave, the third waits
        gpu_app("cpu", None, 1),
    ]

    def running(self, app):
        return [r for r in replicas(self.server, app) if r["state"] == "RUNNING"]

    def test_fractions_pack_without_overcommit(self):
        ok = harness.wait_until(lambda: len(self.running("quarter")) == 4 and
                                len(self.running("half")) == 2, timeout=15)
        self.assertTrue(ok, self.server.status())
        quarter = {tuple(r["gpu_ids"]) for r in self.running("quarter")}
        self.assertEqual(len(quarter), 1, "4 x 0.25 share one device: %r" % quarter)
        half = [tuple(r["gpu_ids"]) for r in self.running("half")]
        self.assertEqual(len(set(half)), 1)
        self.assertNotEqual(set(half), quarter)
        devices = {d["index"]: d for d in self.server.status()["gpus"]["devices"]}
        self.assertEqual(sorted(d["allocated"] for d in devices.values()), [1.0, 1.0])
        self.assertEqual(self.server.status()["gpus"]["source"], "fake")

    def test_pending_replica_says_why(self):
        def pending():
            d = self.server.deployment_status("half", "G")
            return d if "needs 0.5 GPU" in d.get("message", "") else None
        d = harness.wait_until(pending, timeout=15)
        self.assertTrue(d, self.server.deployment_status("half", "G"))
        self.assertIn("2 of 3 replicas running", d["message"])
        self.assertIn("0 free", d["message"])
        self.assertNotEqual(d["status"], "HEALTHY")

    def test_replica_sees_only_its_device(self):
        harness.wait_until(lambda: len(self.running("quarter")) == 4, timeout=15)
        r = self.server.get("/quarter/")
        self.assertEqual(r.status, 200, r)
        body = r.json()
        self.assertEqual(len(body["gpu_ids"]), 1)
        self.assertEqual(body["visible"], str(body["gpu_ids"][0]))

    def test_cpu_replica_sees_no_gpu(self):
        r = self.server.get("/cpu/")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["gpu_ids"], [])
        self.assertEqual(r.json()["visible"], "")

    def test_metrics(self):
        text = self.server.admin_request("GET", "/metrics").body.decode()
        self.assertIn('moonserve_gpu_memory_total_bytes{gpu="0",name="A100"} %d'
                      % (81920 * 1024 * 1024), text)
        harness.assert_promtool_accepts(self, text)


class GpuReleaseTest(unittest.TestCase):
    """A stopped replica frees its share: scaling one deployment down lets a pending one start."""

    def test_release_on_stop(self):
        apps = [dict(gpu_app("a", 1, 1), external_scaler_enabled=True), gpu_app("b", 1, 1)]
        srv = harness.start_server(self, apps, files={"gpu.lua": GPU_LUA},
                                   env={"MOONSERVE_FAKE_GPUS": "A100:81920"})
        running = lambda app: [r for r in replicas(srv, app) if r["state"] == "RUNNING"]
        self.assertTrue(harness.wait_until(lambda: len(running("a")) + len(running("b")) == 1,
                                           timeout=15), srv.status())
        # deployments start in config order: a took the only device, b waits for it
        self.assertEqual(len(running("a")), 1, srv.status())
        self.assertIn("needs 1 GPU", srv.deployment_status("b", "G")["message"])
        r = srv.scale("a", "G", {"target_num_replicas": 0})
        self.assertEqual(r.status, 200, r)
        ok = harness.wait_until(lambda: len(running("b")) == 1, timeout=15)
        self.assertTrue(ok, srv.status())
        self.assertEqual(running("b")[0]["gpu_ids"], [0])


class GpuPolicyTest(unittest.TestCase):
    """The shipped GPU-utilization policy scales on ctx.gpus fed from fake metrics."""

    def test_scales_up_on_utilization(self):
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        metrics = os.path.join(tmp.name, "metrics.json")
        with open(metrics, "w") as f:
            json.dump([{"utilization": 0.9, "memory_used_bytes": 1 << 30},
                       {"utilization": 0.9, "memory_used_bytes": 1 << 30}], f)
        policy = os.path.join(harness.SOURCE_DIR, "scripts", "policies", "gpu_utilization.lua")
        with open(policy) as f:
            policy_text = f.read()
        app = gpu_app("p", 1, None, autoscaling_config={
            "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
            "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.1,
            "look_back_period_s": 0.5,
            "policy": {"policy_function": "gpu_utilization.lua:gpu_utilization_policy",
                       "policy_kwargs": {"target_utilization": 0.6}}})
        del app["deployments"][0]["num_replicas"]
        srv = harness.start_server(self, [app], files={"gpu.lua": GPU_LUA,
                                                       "gpu_utilization.lua": policy_text},
                                   env={"MOONSERVE_FAKE_GPUS": "2xA100:81920",
                                        "MOONSERVE_FAKE_GPU_METRICS": metrics})
        ok = harness.wait_until(
            lambda: sum(r["state"] == "RUNNING" for r in replicas(srv, "p")) == 2, timeout=20)
        self.assertTrue(ok, srv.deployment_status("p", "G"))
        text = srv.admin_request("GET", "/metrics").body.decode()
        self.assertIn('moonserve_gpu_utilization{gpu="0",name="A100"} 0.9', text)


class GpuConfigTest(unittest.TestCase):
    def write(self, d, text):
        path = os.path.join(d, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        with open(os.path.join(d, "gpu.lua"), "w") as f:
            f.write(GPU_LUA)
        return path

    def test_bad_num_gpus(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            path = self.write(d, harness.to_yaml({"applications": [gpu_app("x", 1.5, 1)]}))
            rc, out = run_cli("check", path)
        self.assertNotEqual(rc, 0, out)
        self.assertRegex(out, r"config.yaml:\d+:\d+: ray_actor_options: num_gpus 1.5")

    def test_bad_fake_spec_stops_the_start(self):
        srv = harness.Server([gpu_app("x", 0.5, 1)], files={"gpu.lua": GPU_LUA},
                             env={"MOONSERVE_FAKE_GPUS": "A100"})
        self.addCleanup(srv.cleanup)
        srv._spawn()
        self.assertEqual(srv.proc.wait(timeout=30), 1)
        self.assertIn("MOONSERVE_FAKE_GPUS", srv.stderr_text())


if __name__ == "__main__":
    harness.main()
