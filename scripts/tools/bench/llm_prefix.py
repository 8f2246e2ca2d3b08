#!/usr/bin/env python3
"""Prefix-cache affinity benchmark: moonserve in front of N simulated LLM replicas
(examples/llm/llm_server.py), run twice on the same replay of multi-turn chats: (a) the default
router, (b) scripts/routers/prefix_cache.lua:PrefixCache. Prints mean and p90 time to first
token (client side: request sent -> first SSE `data:` line), requests per replica, and the
prefix-cache hit rate the replicas report beside the best achievable one (an oracle keeping each
conversation on one replica with an unbounded cache).

    python3 scripts/tools/bench/llm_prefix.py [build/moonserve] [--replicas 4] [--convs 48]
        [--turns 5] [--concurrency 8] [--systems 4]

Python 3.9+ stdlib only. tests/integration/test_llm_routing.py imports replay(), run_config()
and run_replay() from here.
"""

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
SERVER = os.path.join(ROOT, "examples", "llm", "llm_server.py")
ROUTER = os.path.join(ROOT, "scripts", "routers", "prefix_cache.lua") + ":PrefixCache"
BLOCK = 64  # llm_server.py's default block size in characters



def replay(convs, turns, systems, seed=1):
    """Requests in arrival order: each a list of messages. Conversations share one of `systems`
    system prompts (~2,000 characters); a conversation's turn t carries its whole history. The
    conversations are interleaved so that turns of one chat are separated by others."""
    rnd = random.Random(seed)
    words = ("alpha beta gamma delta model cache token prompt replica route queue batch "
             "tensor layer vector answer question").split()

    def text(n):
        return " ".join(rnd.choice(words) for _ in range(n))
    sys_prompts = ["You are assistant %d. %s" % (i, text(300)) for i in range(systems)]
    histories = [[{"role": "system", "content": sys_prompts[k % systems]}] for k in range(convs)]
    out = []
    for t in range(turns):
        order = list(range(convs))
        rnd.shuffle(order)
        for k in order:
            histories[k].append({"role": "user", "content": "chat %d turn %d: %s" % (k, t, text(30))})
            out.append(list(histories[k]))
            histories[k].append({"role": "assistant", "content": text(40)})
    return out


def prompt_blocks(messages):
    prompt = "".join("%s: %s\n" % (m["role"], m["content"]) for m in messages)
    keys, prev = [], None
    for i in range(0, len(prompt) - BLOCK + 1, BLOCK):
        prev = hash((prev, prompt[i:i + BLOCK]))
        keys.append(prev)
    return keys


def oracle_hit_rate(requests):
    """Blocks seen before anywhere in the replay / all blocks (unbounded cache, perfect affinity)."""
    seen, hit, total = set(), 0, 0
    for messages in requests:
        keys = prompt_blocks(messages)
        total += len(keys)
        hit += sum(1 for k in keys if k in seen)
        seen.update(keys)
    return hit / max(total, 1)


# The prefix router's settings in the benchmark: a replica may run this many requests above the
# least loaded one before affinity gives way (4 slots per replica, 2 of them spare).
ROUTER_KWARGS = {"imbalanced_threshold": 4}


def run_config(dirname, replicas, router=None, slots=4, cache_blocks=512):
    """A moonserve config: one application without import_path, one process deployment."""
    port, admin = free_port(), free_port()
    router_cfg = ""
    if router:
        router_cfg = ("        request_router_config:\n"
                      "          request_router_class: %s\n"
                      "          request_router_kwargs: %s\n"
                      % (json.dumps(router), json.dumps(ROUTER_KWARGS)))
    cfg = """http_options: {host: 127.0.0.1, port: %d}
admin: {host: 127.0.0.1, port: %d}
applications:
  - name: llm
    route_prefix: /
    deployments:
      - name: LLM
        num_replicas: %d
        max_ongoing_requests: %d
%s        process:
          command: [%s, %s]
          env: {LLM_SLOTS: "%d", LLM_CACHE_BLOCKS: "%d"}
          listen: unix
          ready_path: /health
          health_path: /health
""" % (port, admin, replicas, 4 * slots, router_cfg, json.dumps(sys.executable),
       json.dumps(SERVER), slots, cache_blocks)
    path = os.path.join(dirname, "config.yaml")
    with open(path, "w") as f:
        f.write(cfg)
    return path, port, admin


def running_replicas(admin):
    """RUNNING replicas of llm/LLM in the engine's status document."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
    try:
        conn.request("GET", "/api/serve/applications/")
        doc = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    dep = doc["applications"]["llm"]["deployments"]["LLM"]
    return sum(1 for r in dep.get("replicas") or [] if r["state"] == "RUNNING")


def start(binary, config, admin, replicas, timeout=60):
    """Runs moonserve and waits until the status document shows every replica RUNNING (asking
    the replicas themselves would not do: an affinity router sends the same probe to one)."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([binary, "run", config], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if running_replicas(admin) == replicas:
                proc.err_file = err  # closed by stop()
                return proc
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            err.seek(0)
            text = err.read().decode()[-2000:]
            err.close()
            raise RuntimeError("moonserve did not run %d replicas: %s" % (replicas, text))
        time.sleep(0.1)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if getattr(proc, "err_file", None):
        proc.err_file.close()


def request(port, messages, stream=True, max_tokens=16, conn=None):
    """One chat request; returns {ttft, replica, blocks, hit, chunks}."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"model": "m", "messages": messages, "stream": stream,
                       "max_tokens": max_tokens}).encode()  # bytes: one send with the head
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError("status %d: %r" % (r.status, r.read()[:300]))
    ttft, chunks, done = None, 0, not stream
    if stream:
        while True:
            line = r.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                if ttft is None:
                    ttft = time.monotonic() - t0
                if line.strip() == b"data: [DONE]":
                    done = True
                else:
                    json.loads(line[6:])
                    chunks += 1
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    else:
        r.read()
        ttft = time.monotonic() - t0
    out = {"ttft": ttft, "replica": r.getheader("x-replica-id"), "chunks": chunks,
           "blocks": int(r.getheader("x-prompt-blocks") or 0),
           "hit": int(r.getheader("x-prefix-cache-hit-blocks") or 0)}
    if own:
        conn.close()
    return out


def run_replay(port, requests, concurrency):
    """Sends the replay with `concurrency` clients, each taking the next request (a turn is
    sent only after the conversation's previous turn finished, as a user would)."""
    results, lock = [None] * len(requests), threading.Lock()
    nxt = [0]

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(requests):
                break
            results[i] = request(port, requests[i], conn=conn)
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(results):
    ttfts = sorted(r["ttft"] * 1000 for r in results)
    per = {}
    for r in results:
        per[r["replica"]] = per.get(r["replica"], 0) + 1
    return {"mean_ms": sum(ttfts) / len(ttfts), "p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))],
            "hit_rate": sum(r["hit"] for r in results) / max(sum(r["blocks"] for r in results), 1),
            "per_replica": sorted(per.values(), reverse=True)}


def measure(binary, replicas, requests, concurrency, router):
    with tempfile.TemporaryDirectory(prefix="llm-prefix-") as d:
        config, port, admin = run_config(d, replicas, router)
        proc = start(binary, config, admin, replicas)
        try:
            return summarize(run_replay(port, requests, concurrency))
        finally:
            stop(proc)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("binary", nargs="?", default=os.path.join(ROOT, "build", "moonserve"))
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--convs", type=int, default=48)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--systems", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8)
    a = p.parse_args()
    # a turn must follow its previous one: concurrency below the conversations per round keeps
    # the interleaved replay in order (a conversation's turns are `convs` requests apart)
    assert a.concurrency <= a.convs, "concurrency must not exceed the number of conversations"
    requests = replay(a.convs, a.turns, a.systems)
    print("%d requests (%d conversations x %d turns, %d system prompts), %d replicas, "
          "concurrency %d" % (len(requests), a.convs, a.turns, a.systems, a.replicas,
                              a.concurrency))
    rows = [("default (power of two)", measure(a.binary, a.replicas, requests, a.concurrency, None)),
            ("prefix_cache.lua", measure(a.binary, a.replicas, requests, a.concurrency, ROUTER))]
    print("%-24s %10s %10s %9s  %s" % ("router", "mean ms", "p90 ms", "hit rate", "per replica"))
    for name, s in rows:
        print("%-24s %10.1f %10.1f %8.1f%%  %s" % (name, s["mean_ms"], s["p90_ms"],
                                                   100 * s["hit_rate"], s["per_replica"]))
    print("best achievable hit rate (oracle): %.1f%%" % (100 * oracle_hit_rate(requests)))
    a_, b_ = rows[0][1], rows[1][1]
    print("prefix_cache vs default: mean TTFT %+.0f%%, p90 %+.0f%%"
          % (100 * (b_["mean_ms"] / a_["mean_ms"] - 1), 100 * (b_["p90_ms"] / a_["p90_ms"] - 1)))


if __name__ == "__main__":
    main()
