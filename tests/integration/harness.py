"""Shared harness for moonserve's integration tests (Python 3 stdlib only).

A test starts the real binary (``$MOONSERVE_BIN run CONFIG``) on a free port with a config and Lua
files written into a fresh temporary directory, talks to it over real sockets, and on teardown
sends SIGTERM to that one pid and checks that:

* the process exits with code 0 within a bound,
* its stderr holds no sanitizer report,
* none of its child processes (replicas) outlive it.

Nothing here uses a fixed port or kills anything by name: ports come from binding port 0, and
the only processes ever signalled are the server we started and the children we found under it
in /proc.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("MS_SOURCE_DIR") or os.path.abspath(os.path.join(HERE, "..", ".."))
BIN = os.environ.get("MOONSERVE_BIN") or os.path.join(SOURCE_DIR, "build", "moonserve")

SANITIZER_MARKERS = (
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
    "WARNING: ThreadSanitizer",
)

HEALTH_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------------------------
# small utilities


def free_port(host="127.0.0.1"):
    """A port the kernel just handed out (bind port 0, read it back, close)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def to_yaml(value, indent=0):
    """Emit a small YAML document (block style) from dicts/lists/scalars."""
    pad = "  " * indent
    out = []
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append("%s%s:\n%s" % (pad, k, to_yaml(v, indent + 1)))
            else:
                out.append("%s%s: %s\n" % (pad, k, _yaml_scalar(v)))
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        for item in value:
            if isinstance(item, dict) and item:
                body = to_yaml(item, indent + 1)
                # first line of the mapping goes after the dash
                first, _, rest = body.partition("\n")
                out.append("%s- %s\n%s" % (pad, first.strip(), rest))
            elif isinstance(item, list) and item:
                out.append("%s-\n%s" % (pad, to_yaml(item, indent + 1)))
            else:
                out.append("%s- %s\n" % (pad, _yaml_scalar(item)))
        return "".join(out)
    return pad + _yaml_scalar(value) + "\n"


def _yaml_scalar(v):
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict) and not v:
        return "{}"
    if isinstance(v, list) and not v:
        return "[]"
    return json.dumps(str(v))  # a double-quoted JSON string is a valid YAML scalar


def proc_stat(pid):
    """(ppid, state, starttime) of pid from /proc, or None if it does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces and parentheses: split at the last ')'
    rest = data[data.rfind(")") + 2:].split()
    # rest[0]=state rest[1]=ppid ... starttime is field 22 overall -> rest[19]
    try:
        return int(rest[1]), rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def children_of(pid):
    """Direct children of pid: list of (pid, starttime). Zombies are included."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st and st[0] == pid:
            kids.append((int(name), st[2]))
    return kids


def descendants_of(pid):
    """All live descendants of pid (pid, starttime), breadth first."""
    seen = []
    frontier = [pid]
    for _ in range(8):  # bounded depth
        nxt = []
        for p in frontier:
            for k in children_of(p):
                if k not in seen:
                    seen.append(k)
                    nxt.append(k[0])
        if not nxt:
            break
        frontier = nxt
    return seen


def is_alive(pid, starttime=None):
    """True if pid exists, is not a zombie and (when given) started at starttime."""
    st = proc_stat(pid)
    if st is None:
        return False
    if starttime is not None and st[2] != starttime:
        return False  # pid was reused by someone else
    return st[1] not in ("Z", "X")


def rss_mib(pid):
    """The process's resident set (VmRSS of /proc/PID/status) in MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/%d/status" % pid)


def wait_until(pred, timeout, interval=0.05):
    """Poll pred() until it returns a truthy value or timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# HTTP helpers


class Response(object):
    def __init__(self, status, reason, headers, body, chunked=False, version="HTTP/1.1",
                 header_list=None):
        self.status = status
        self.reason = reason
        self.headers = headers  # lower-case name -> value (last wins)
        self.header_list = header_list or []
        self.body = body
        self.chunked = chunked
        self.version = version

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError as e:
            raise AssertionError("response body is not JSON (%s): %r" % (e, self.body[:500]))

    def __repr__(self):
        return "<Response %d %r headers=%r body=%r>" % (self.status, self.reason, self.headers,
                                                         self.body[:300])


class ConnectionClosed(Exception):
    pass


class HTTPReader(object):
    """Reads HTTP/1.x responses from a socket, keeping leftover bytes for the next one."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionClosed("connection closed by server (buffered %r)" % self.buf[:200])
        self.buf += data

    def _read_line(self, limit=1 << 20):
        while b"\r\n" not in self.buf:
            if len(self.buf) > limit:
                raise AssertionError("line too long")
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _read_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, head_request=False):
        line = self._read_line()
        m = re.match(rb"^(HTTP/1\.[01]) (\d{3})(?: (.*))?$", line)
        if not m:
            raise AssertionError("bad status line %r" % line)
        version = m.group(1).decode()
        status = int(m.group(2))
        reason = (m.group(3) or b"").decode("latin-1")
        headers = {}
        header_list = []
        while True:
            h = self._read_line()
            if h == b"":
                break
            name, sep, value = h.partition(b":")
            if not sep:
                raise AssertionError("bad header line %r" % h)
            n = name.decode("latin-1").strip().lower()
            v = value.decode("latin-1").strip()
            headers[n] = v
            header_list.append((n, v))
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if head_request or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif chunked:
            parts = []
            while True:
                size_line = self._read_line()
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    # trailers until empty line
                    while self._read_line() != b"":
                        pass
                    break
                parts.append(self._read_exact(size))
                if self._read_line() != b"":
                    raise AssertionError("chunk not followed by CRLF")
            body = b"".join(parts)
        elif "content-length" in headers:
            body = self._read_exact(int(headers["content-length"]))
        else:
            # close-delimited
            while True:
                try:
                    self._fill()
                except ConnectionClosed:
                    break
            body, self.buf = self.buf, b""
        return Response(status, reason, headers, body, chunked, version, header_list)


def read_until_closed(sock, timeout):
    """Read everything until the peer closes; returns (data, closed_flag). Bounded by timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


def parse_response_bytes(data):
    """Parse one complete response from bytes (e.g. what read_until_closed returned)."""

    class _Buf(object):
        def __init__(self, d):
            self.d = d

        def recv(self, n):
            out, self.d = self.d[:n], self.d[n:]
            return out

    return HTTPReader(_Buf(data)).read_response()


def build_request(method, path, headers=None, body=None, version="HTTP/1.1", host="x"):
    lines = ["%s %s %s" % (method, path, version)]
    hdrs = {"Host": host}
    if headers:
        hdrs.update(headers)
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                     for k in hdrs):
        hdrs["Content-Length"] = str(len(body))
    for k, v in hdrs.items():
        lines.append("%s: %s" % (k, v))
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is not None:
        raw += body if isinstance(body, bytes) else body.encode()
    return raw


# --------------------------------------------------------------------------------------------
# Lua applications used by several tests

HELLO_LUA = r'''
local serve = require "moonserve"

local function self_pid()
  if serve.getpid then return serve.getpid() end
  local ok, pid = pcall(function()
    local f = io.open("/proc/self/stat", "r")
    if not f then return nil end
    local s = f:read("*l"); f:close()
    return tonumber(s:match("^(%d+)"))
  end)
  if ok then return pid end
  return nil
end

local Hello = serve.deployment { name = "Hello" }
function Hello:init(greeting) self.greeting = greeting or "hi" end
function Hello:reconfigure(cfg) self.suffix = cfg and cfg.suffix end
function Hello:__call(req)
  if req.path:find("boom") then error("kaboom") end
  if req.path:find("tblerr") then error({ weird = true }) end
  if req.path:find("badstatus") then return serve.response { status = 42, body = "no" } end
  if req.query.sleep then serve.sleep(tonumber(req.query.sleep)) end
  local ctx = serve.get_replica_context()
  if req.path:find("status") then
    return serve.response { status = 201, headers = { ["x-custom"] = "yes" }, body = "created" }
  end
  if req.path:find("text") then return "plain " .. self.greeting end
  if req.path:find("stream") then
    local n, gap = tonumber(req.query.n or "3"), tonumber(req.query.gap or "0")
    return serve.stream(function(send)
      for i = 1, n do
        send("part-" .. i .. ";")
        if gap > 0 then serve.sleep(gap) end
      end
    end)
  end
  if req.path:find("big") then
    return string.rep("0123456789abcdef", tonumber(req.query.n or "65536"))
  end
  if req.path:find("json") then return { got = req:json() } end
  return { msg = self.greeting, suffix = self.suffix, path = req.path, method = req.method,
           body = req.body, query = req.query, headers = req.headers, id = req.id,
           replica = ctx.replica_id, app = ctx.app_name, deployment = ctx.deployment,
           pid = self_pid() }
end

return { app = Hello:bind("hi"),
         build = function(args) return Hello:bind(args and args.greeting or "built") end }
'''

ECHO_LUA = r'''
local serve = require "moonserve"
local Echo = serve.deployment { name = "Echo" }
function Echo:__call(req)
  return serve.response { status = 200,
                          headers = { ["content-type"] = "application/octet-stream" },
                          body = req.body or "" }
end
return { app = Echo:bind() }
'''

COMPOSE_LUA = r'''
local serve = require "moonserve"
local Model = serve.deployment { name = "Model" }
function Model:init(factor) self.factor = factor end
function Model:__call(req)
  local x = req:json().x
  return { y = x * self.factor, deployment = serve.get_replica_context().deployment }
end
local Ingress = serve.deployment { name = "Ingress" }
function Ingress:init(model) self.model = model end
function Ingress:__call(req)
  local x = tonumber(req.query.x or "1")
  local out = self.model:remote({ x = x }):result()
  return { x = x, y = out.y, via = out.deployment,
           deployment = serve.get_replica_context().deployment }
end
return { app = Ingress:bind(Model:bind(3)) }
'''


def hello_app(name="hello", route_prefix="/hello", deployment=None, import_path="hello.lua:app",
              args=None):
    app = {"name": name, "route_prefix": route_prefix, "import_path": import_path}
    if args is not None:
        app["args"] = args
    if deployment:
        d = {"name": "Hello"}
        d.update(deployment)
        app["deployments"] = [d]
    return app


# --------------------------------------------------------------------------------------------
# the server under test


class Server(object):
    """One `moonserve run` process with its own tempdir, port, config and Lua files."""

    def __init__(self, applications, http_options=None, files=None, extra_config=None,
                 shutdown_timeout_s=15.0, env=None):
        self.tmp = tempfile.TemporaryDirectory(prefix="moonserve-it-")
        self.dir = self.tmp.name
        self.host = "127.0.0.1"
        self._applications = applications
        self._http_options = http_options
        self._extra_config = extra_config
        self.config_path = os.path.join(self.dir, "config.yaml")
        self._write_config()
        all_files = {"hello.lua": HELLO_LUA, "echo.lua": ECHO_LUA, "compose.lua": COMPOSE_LUA}
        all_files.update(files or {})
        for name, text in all_files.items():
            path = os.path.join(self.dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.stdout_path = os.path.join(self.dir, "stdout.log")
        self.proc = None
        self.known_children = set()  # (pid, starttime) of every descendant we ever saw
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopped = False
        self.env = env or {}  # extra environment for the server (e.g. MOONSERVE_FAKE_GPUS)

    def _write_config(self):
        self.port = free_port(self.host)
        opts = {"host": self.host, "port": self.port}
        opts.update(self._http_options or {})
        self.http_options = opts
        cfg = {"http_options": opts, "applications": self._applications}
        # Every server gets its own admin listener on a free port: the default (8265) would be
        # shared by every test running in parallel.
        self.admin_port = free_port(self.host)
        admin = {"host": self.host, "port": self.admin_port}
        extra = dict(self._extra_config or {})
        if "admin" in extra:
            admin.update(extra.pop("admin") or {})
            self.admin_port = admin.get("port", self.admin_port)
        self.admin_token = admin.get("token")
        cfg["admin"] = admin
        cfg.update(extra)
        with open(self.config_path, "w") as f:
            f.write(to_yaml(cfg))

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, wait=True, attempts=3):
        """Start the server; if the port we picked was taken meanwhile, retry on a new one."""
        if not os.path.exists(BIN):
            raise AssertionError("MOONSERVE_BIN %r does not exist" % BIN)
        for attempt in range(attempts):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_healthy()
                return self
            except AssertionError:
                lost_port = (self.proc.poll() is not None and
                             "address already in use" in self.stderr_text().lower())
                if not lost_port or attempt == attempts - 1:
                    raise
                self._close_files()
                self._write_config()
        return self

    def _spawn(self):
        self._stderr = open(self.stderr_path, "wb")
        self._stdout = open(self.stdout_path, "wb")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        env.update(self.env)
        self.proc = subprocess.Popen([BIN, "run", self.config_path], cwd=self.dir,
                                     stdin=subprocess.DEVNULL, stdout=self._stdout,
                                     stderr=self._stderr, env=env)
        self.pid = self.proc.pid

    def wait_healthy(self, timeout=HEALTH_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("moonserve exited with %r before becoming healthy; "
                                     "stderr:\n%s" % (self.proc.returncode, self.stderr_tail()))
            try:
                r = self.request("GET", "/-/healthz", timeout=1.0)
                last = r
                if r.status == 200:
                    self.snapshot_children()
                    return r
            except (OSError, http.client.HTTPException) as e:
                last = e
            time.sleep(0.05)
        self.kill_all()
        raise AssertionError("moonserve not healthy after %.0fs (last: %r); stderr:\n%s"
                             % (timeout, last, self.stderr_tail()))

    def snapshot_children(self):
        """Record every current descendant so teardown can check none survives."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        kids = descendants_of(self.pid)
        self.known_children.update(kids)
        return kids

    def replica_pids(self):
        """Live direct children of the server (the replica processes)."""
        kids = [k for k in children_of(self.pid) if is_alive(*k)]
        self.known_children.update(kids)
        return sorted(p for p, _ in kids)

    def wait_replicas(self, n, timeout=10.0, exclude=()):
        """Wait until exactly n live children exist (none of them in exclude)."""
        def ok():
            pids = self.replica_pids()
            # a tuple, so that n == 0 (an empty list) still counts as reached
            return (pids,) if len(pids) == n and not (set(pids) & set(exclude)) else None
        got = wait_until(ok, timeout, 0.05)
        if not got:
            raise AssertionError("expected %d replica processes (excluding %r), have %r; "
                                 "stderr:\n%s" % (n, list(exclude), self.replica_pids(),
                                                  self.stderr_tail()))
        return got[0]

    def wait_serving_replicas(self, path, n, timeout=10.0):
        """Until n distinct replica ids answered `path` (a hello.lua route): all n are ready.
        Sends n concurrent requests sleeping 0.2 s per round."""
        seen = set()
        deadline = time.monotonic() + timeout
        sep = "&" if "?" in path else "?"
        while len(seen) < n and time.monotonic() < deadline:
            res = run_threads(lambda i: self.get("%s%ssleep=0.2&w=%d" % (path, sep, i),
                                                 timeout=5),
                              [(i,) for i in range(n)], timeout=10)
            for r, e in res:
                if r is not None and r.status == 200:
                    seen.add(r.json().get("replica"))
        if len(seen) < n:
            raise AssertionError("only replicas %r answered %s within %.0fs"
                                 % (sorted(seen), path, timeout))
        return seen

    def run_dirs(self):
        """Folders holding the replicas' sockets (from their --socket arguments)."""
        dirs = set()
        for p in self.replica_pids():
            cmd = proc_cmdline(p)
            if "--socket" in cmd[:-1]:
                dirs.add(os.path.dirname(cmd[cmd.index("--socket") + 1]))
        return sorted(dirs)

    def send_signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig=signal.SIGTERM, timeout=None, check=True):
        """SIGTERM (by pid), wait, and check exit code, sanitizer output and leftovers."""
        if self.stopped:
            return
        self.stopped = True
        timeout = self.shutdown_timeout_s if timeout is None else timeout
        problems = []
        try:
            if self.proc.poll() is None:
                self.snapshot_children()
                os.kill(self.pid, sig)
            rc = self.wait_exit(timeout)
            if rc is None:
                problems.append("moonserve did not exit within %.1fs of %s"
                                % (timeout, signal.Signals(sig).name))
                self.kill_all()
                rc = self.wait_exit(5)
            elif rc != 0:
                problems.append("moonserve exited with code %r (expected 0)" % rc)
            problems.extend(self.check_leftovers())
            problems.extend(self.check_sanitizers())
        finally:
            self._close_files()
        if check and problems:
            raise AssertionError("; ".join(problems) + "\nstderr tail:\n" + self.stderr_tail())
        return problems

    def processes_mentioning_dir(self):
        """Live processes whose command line names our temp dir (e.g. replicas via --import):
        catches children we never saw in a snapshot, even once reparented to init."""
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            pid = int(name)
            if any(self.dir in a for a in proc_cmdline(pid)):
                st = proc_stat(pid)
                if st and st[1] not in ("Z", "X"):
                    found.add((pid, st[2]))
        return found

    def check_leftovers(self, timeout=3.0):
        deadline = time.monotonic() + timeout
        while True:
            self.known_children.update(p for p in self.processes_mentioning_dir()
                                       if self.proc is None or p[0] != self.pid)
            left = [p for p, st in self.known_children if is_alive(p, st)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if left:
            desc = ["%d %r" % (p, proc_cmdline(p)) for p in left]
            # do not leave them behind for the next test: kill by pid (we recorded them)
            for p, st in list(self.known_children):
                if is_alive(p, st):
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
            return ["child processes left behind: %s" % ", ".join(desc)]
        return []

    def check_sanitizers(self):
        text = self.stderr_text()
        found = [m for m in SANITIZER_MARKERS if m in text]
        if found:
            return ["sanitizer report in stderr: %s" % ", ".join(found)]
        return []

    def kill_all(self):
        """Emergency cleanup: SIGKILL the server and every descendant we know, by pid."""
        self.snapshot_children()
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            self.wait_exit(5)
        for p, st in list(self.known_children):
            if is_alive(p, st):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    def _close_files(self):
        for f in (getattr(self, "_stderr", None), getattr(self, "_stdout", None)):
            if f and not f.closed:
                f.close()

    def cleanup(self):
        """Last-resort cleanup (always safe to call)."""
        if self.proc is not None and not self.stopped:
            self.kill_all()
            self.stopped = True
        self._close_files()
        if os.environ.get("MS_KEEP_TMP"):
            sys.stderr.write("keeping %s\n" % self.dir)
        else:
            self.tmp.cleanup()

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, n=4000):
        t = self.stderr_text()
        return t[-n:]

    # -- HTTP ---------------------------------------------------------------------------------

    def connect(self, timeout=5.0):
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(timeout)
        return s

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        """One request over a fresh http.client connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            return Response(r.status, r.reason, hdrs, data,
                            "chunked" in hdrs.get("transfer-encoding", "").lower(),
                            "HTTP/1.%d" % (r.version - 10), list(r.getheaders()))
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def raw(self, data, timeout=5.0, n_responses=1):
        """Send raw bytes on a fresh socket and read n responses (keeps the socket closed)."""
        s = self.connect(timeout)
        try:
            s.sendall(data)
            rd = HTTPReader(s)
            return [rd.read_response() for _ in range(n_responses)]
        finally:
            s.close()

    @property
    def base(self):
        return "http://%s:%d" % (self.host, self.port)

    # -- admin API ----------------------------------------------------------------------------

    def admin_request(self, method, path, body=None, headers=None, timeout=10.0, token=None):
        """One request to the admin listener; `body` may be a dict/list (sent as JSON)."""
        hdrs = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        tok = token if token is not None else self.admin_token
        if tok:
            hdrs.setdefault("Authorization", "Bearer " + tok)
        conn = http.client.HTTPConnection(self.host, self.admin_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            h = {k.lower(): v for k, v in r.getheaders()}
            return Response(r.status, r.reason, h, data,
                            "chunked" in h.get("transfer-encoding", "").lower(),
                            "HTTP/1.%d" % (r.version - 10), list(r.getheaders()))
        finally:
            conn.close()

    def status(self, timeout=5.0):
        """GET /api/serve/applications/ (must answer 200 with JSON)."""
        r = self.admin_request("GET", "/api/serve/applications/", timeout=timeout)
        if r.status != 200:
            raise AssertionError("GET /api/serve/applications/ -> %r" % r)
        return r.json()

    def deployment_status(self, app, deployment):
        """applications[app].deployments[deployment] of the status document."""
        doc = self.status()
        try:
            return doc["applications"][app]["deployments"][deployment]
        except (KeyError, TypeError):
            raise AssertionError("no %s/%s in status: %s" % (app, deployment,
                                                             json.dumps(doc)[:2000]))

    def running_replicas(self, app, deployment):
        """Replicas of a deployment whose state is RUNNING in status."""
        d = self.deployment_status(app, deployment)
        return [r for r in d.get("replicas") or [] if r.get("state") == "RUNNING"]

    def wait_status(self, app, deployment, pred, timeout=10.0, what="condition"):
        """Poll the deployment's status until pred(dep) is truthy; returns dep. Bounded."""
        last = [None]

        def ok():
            try:
                last[0] = self.deployment_status(app, deployment)
            except (OSError, http.client.HTTPException, AssertionError) as e:
                last[0] = e
                return None
            return last[0] if pred(last[0]) else None
        got = wait_until(ok, timeout, 0.05)
        if not got:
            raise AssertionError("%s/%s: %s not reached within %.1fs; last status: %s\n"
                                 "stderr:\n%s" % (app, deployment, what, timeout,
                                                   json.dumps(last[0], default=str)[:3000],
                                                   self.stderr_tail(2500)))
        return got

    def reload(self, timeout=10.0):
        """POST /api/v1/reload: (status code, JSON body)."""
        r = self.admin_request("POST", "/api/v1/reload", timeout=timeout)
        try:
            body = r.json()
        except AssertionError:
            body = None
        return r.status, body

    def scale(self, app, deployment, body, timeout=5.0):
        """POST /api/v1/applications/{app}/deployments/{deployment}/scale; body: int or raw."""
        if isinstance(body, int) and not isinstance(body, bool):
            body = {"target_num_replicas": body}
        return self.admin_request("POST", "/api/v1/applications/%s/deployments/%s/scale"
                                  % (app, deployment), body=body, timeout=timeout,
                                  headers={"Content-Type": "application/json"})

    def write_file(self, name, text):
        """(Re)write a file in the server's folder (e.g. a policy script before a reload)."""
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return path


# --------------------------------------------------------------------------------------------
# unittest glue


class ServerTestCase(unittest.TestCase):
    """A test class sharing one server. Subclasses set APPLICATIONS / HTTP_OPTIONS / FILES."""

    APPLICATIONS = None
    HTTP_OPTIONS = None
    FILES = None
    EXTRA_CONFIG = None
    SHUTDOWN_TIMEOUT_S = 15.0
    ENV = None

    @classmethod
    def make_server(cls):
        """The shared server, not started (a subclass may serve something else: an example)."""
        return Server(cls.APPLICATIONS, cls.HTTP_OPTIONS, cls.FILES,
                      extra_config=cls.EXTRA_CONFIG, shutdown_timeout_s=cls.SHUTDOWN_TIMEOUT_S,
                      env=cls.ENV)

    @classmethod
    def setUpClass(cls):
        cls.server = cls.make_server()
        try:
            cls.server.start()
        except BaseException:
            cls.server.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
        finally:
            cls.server.cleanup()

    def assertErrorJSON(self, r, status):
        """Error responses: status, JSON body with request_id equal to X-Request-ID."""
        self.assertEqual(r.status, status, r)
        rid = r.header("x-request-id")
        self.assertTrue(rid, "no X-Request-ID on %r" % r)
        body = r.json()
        self.assertIsInstance(body, dict, r)
        self.assertEqual(body.get("request_id"), rid, "request_id in body != X-Request-ID: %r" % r)
        return body


def start_server(testcase, applications, http_options=None, files=None, shutdown_timeout_s=15.0,
                 wait=True, extra_config=None, env=None):
    """Start a server owned by one test; cleanup always runs (kill on failure).
    `extra_config` adds top-level keys (control_loop, admin, ...); `env` adds environment."""
    srv = Server(applications, http_options, files, extra_config=extra_config,
                 shutdown_timeout_s=shutdown_timeout_s, env=env)
    testcase.addCleanup(srv.cleanup)
    srv.start(wait=wait)
    return srv


def run_threads(fn, args_list, timeout):
    """Run fn(*args) in threads; returns list of (result, exception) in order. Bounded."""
    results = [None] * len(args_list)

    def runner(i, a):
        try:
            results[i] = (fn(*a), None)
        except BaseException as e:  # noqa
            results[i] = (None, e)

    threads = [threading.Thread(target=runner, args=(i, a), daemon=True)
               for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for i, t in enumerate(threads):
        if t.is_alive():
            results[i] = (None, AssertionError("thread %d still running after %.1fs" % (i, timeout)))
    return results


class LoadGen(object):
    """`n` threads sending `path` to the server in a loop (fresh connection each) until stop().
    Keeps every outcome: statuses (a Counter-like dict), failures (non-200s and exceptions).
    Bounded: each request has a timeout and stop() joins with a deadline."""

    def __init__(self, server, path, n, timeout=10.0, headers=None):
        self.server = server
        self.path = path
        self.n = n
        self.timeout = timeout
        self.headers = headers
        self.statuses = {}
        self.failures = []
        self.count = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = []

    def _run(self, i):
        k = 0
        while not self._stop.is_set():
            k += 1
            path = self.path.replace("{i}", str(i)).replace("{k}", str(k))
            try:
                r = self.server.get(path, timeout=self.timeout, headers=self.headers)
                with self.lock:
                    self.count += 1
                    self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                    if r.status != 200:
                        self.failures.append(r)
            except Exception as e:  # noqa: any failure is recorded
                with self.lock:
                    self.count += 1
                    self.failures.append(e)
                time.sleep(0.05)

    def start(self):
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(self.n)]
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout=None):
        self._stop.set()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout + 5)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in self.threads if t.is_alive()]
        if stuck:
            self.failures.append(AssertionError("%d load threads still running" % len(stuck)))
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def assert_promtool_accepts(testcase, text):
    """`promtool check metrics` (Debian's prometheus, installed by the bootstrap) finds nothing
    to say about a /metrics text: it parses, and every family has help and a proper name."""
    if not shutil.which("promtool"):
        raise AssertionError("promtool missing: the bootstrap installs Debian's prometheus")
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                       capture_output=True, timeout=30)
    said = (p.stdout + p.stderr).decode().strip()
    testcase.assertEqual((p.returncode, said), (0, ""), text[:3000])


class SideEffect(object):
    """A counter that a cancelled request's work (a grandchild, a stream's producer) bumps every
    20 ms, read through `path`, whose answer is [before, after]: the counter, and the counter
    again after a short window. The work has stopped once the two agree."""

    def __init__(self, test, path, limit=500):
        self.test, self.path, self.limit = test, path, limit

    def count_twice(self):
        r = self.test.server.get(self.path, timeout=10)
        self.test.assertEqual(r.status, 200, r)
        return r.json()

    def wait_started(self):
        self.test.assertTrue(wait_until(lambda: self.count_twice()[0] > 0, 10),
                             "the work never started")

    def assert_stops(self):
        """The counter stays put over the window before the work could have ended by itself."""
        seen = []

        def stable():
            a, b = self.count_twice()
            seen.append((a, b))
            return a == b
        self.test.assertTrue(wait_until(stable, 8), "the work kept going: %r" % seen[-3:])
        self.test.assertGreater(seen[-1][0], 0, "the work never started: %r" % seen)
        self.test.assertLess(seen[-1][0], self.limit, "the work ran to its end: %r" % seen)


class RedisServer(object):
    """A real redis-server on a free loopback port, in a temp folder, without persistence; stop()
    and start() again keep the port, so clients can be seen coming back. `call()` is a minimal
    RESP client for the tests' own reads (XLEN, XRANGE, HGETALL)."""

    def __init__(self, durable=False):
        if not shutil.which("redis-server"):
            raise unittest.SkipTest("redis-server is not installed (scripts/tools/bootstrap.sh)")
        self.dir = tempfile.mkdtemp(prefix="moonserve-redis-")
        self.port = free_port()
        self.proc = None
        self.durable = durable  # append-only file, fsync'd each write: a kill -9 loses nothing

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        ok = wait_until(lambda: self._ping(), timeout)
        if not ok:
            raise AssertionError("redis-server did not answer on port %d" % self.port)
        return self

    def _ping(self):
        try:
            return self.call("PING") == "PONG"
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def call(self, *args):
        """One command; the reply as Python values (bulk strings decoded as UTF-8)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            out = b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
            s.sendall(out)
            f = s.makefile("rb")
            return self._read(f)

    def _read(self, f):
        line = f.readline()
        if not line:
            raise OSError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise AssertionError("redis error: " + rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data.decode("utf-8", "replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise AssertionError("unexpected RESP reply %r" % line)


def start_redis(testcase, durable=False):
    """A redis-server owned by one test (or class, from setUpClass with addClassCleanup)."""
    r = RedisServer(durable)
    (testcase.addClassCleanup if isinstance(testcase, type) else testcase.addCleanup)(r.cleanup)
    return r.start()


def run_cli(*args, timeout=30):
    """Run the binary with args; returns (rc, stdout+stderr text)."""
    p = subprocess.run([BIN] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def main():
    unittest.main(verbosity=2)
