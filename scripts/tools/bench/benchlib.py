"""What the Python benchmark drivers share: free ports and running wrk."""

import re
import signal
import socket
import subprocess


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wrk(url, threads, conns, duration, warmup=0, script=None):
    """Runs wrk (after an unmeasured warm-up) and returns (requests/s, p50 ms, p99 ms, requests);
    raises when wrk fails or any answer was not 2xx."""
    base = ["wrk", "-t%d" % threads, "-c%d" % conns] + (["-s", script] if script else [])
    if warmup:
        subprocess.run(base + ["-d%ds" % warmup, url], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    out = subprocess.run(base + ["-d%ds" % duration, "--latency", url], capture_output=True,
                         text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError("non-2xx answers:\n" + out)

    def ms(label):
        m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(label), out, re.M)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M).group(1))
    requests = int(re.search(r"^\s*(\d+) requests in", out, re.M).group(1))
    return rps, ms("50%"), ms("99%"), requests


def stop(proc, timeout=60):
    """SIGTERM (the engine drains), then SIGKILL if it has not exited within timeout s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
