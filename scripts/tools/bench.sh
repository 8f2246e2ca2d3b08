#!/usr/bin/env bash
# The peer benchmark (docs/performance.md): wrk on loopback against moonserve serving a no-op Lua
# deployment (1 and 2 replicas) and, in the same run, interleaved round by round under the same
# CPU pinning, against three peers that do the same work through a front and a back process:
# nginx reverse-proxying to an nginx+Lua backend over a Unix socket, HAProxy in front of the same
# backend, and a Python ASGI proxy (uvicorn) forwarding to a uvicorn ASGI replica over a Unix
# socket (the stand-in for Ray Serve's proxy architecture). For every run it prints requests/s,
# p50, p99, the CPU steal seen by the machine, the servers' CPU per request and their memory; then
# the throughput ratios moonserve / each peer at 64 connections, per pinning. Last, a figure the
# machine's noise does not move: instructions per request of every server process over a fixed
# request count under valgrind's callgrind (perf's hardware counters are not available here).
#
# Environment: DURATION (seconds per measurement, default 5), WARMUP (seconds, default 1),
# CONNECTIONS (list, default "64 8"; ratios use 64), THREADS (wrk threads; default one per CPU
# wrk may run on: 1 when pinned to CPU 0, 2 unpinned),
# PINS (list of none|split|contended, default "split none"; split: servers on CPU 1, wrk on
# CPU 0; contended: as split, with a busy loop on CPU 1 competing with the servers during every
# run, the stand-in for other work sharing their core; PIN is read when PINS is unset), SYSTEMS (default "moonserve nginx haproxy asgi"), REPLICAS (list,
# default "1 2"), ROUNDS (default 1; with more, medians are reported too), SKIP_BUILD=1 to use
# the existing build/moonserve, RELOAD_ROW (default 1: one more moonserve-1r run at the first
# CONNECTIONS value while every policy script is hot-reloaded every 100 ms; 0 skips it),
# INSTR (default 1; 0 skips the callgrind phase), INSTR_REQUESTS (default 20000),
# INSTR_SYSTEMS (default "moonserve nginx haproxy"; add asgi for the Python pair, slow),
# INSTR_KEEP=DIR to keep the callgrind dumps there (for callgrind_annotate: the dump ending in
# .1 holds the counted requests).
#
# Exits non-zero only when a measurement fails (a server does not come up, wrk fails, or a
# response is not 2xx); never because of a ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/scripts/tools/bench"

DURATION="${DURATION:-5}"
WARMUP="${WARMUP:-1}"
CONNECTIONS="${CONNECTIONS:-64 8}"
THREADS="${THREADS:-}"
PINS="${PINS:-${PIN:-split none}}"
SYSTEMS="${SYSTEMS:-moonserve nginx haproxy asgi}"
REPLICAS="${REPLICAS:-1 2}"
ROUNDS="${ROUNDS:-1}"
RELOAD_ROW="${RELOAD_ROW:-1}"
INSTR="${INSTR:-1}"
INSTR_REQUESTS="${INSTR_REQUESTS:-20000}"
INSTR_SYSTEMS="${INSTR_SYSTEMS:-moonserve nginx haproxy}"
ratio_conns="${CONNECTIONS%% *}"

"$root/scripts/tools/bootstrap.sh" nginx libnginx-mod-http-lua haproxy python3-uvicorn \
  python3-uvloop python3-httptools valgrind
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$root/scripts/tools/build.sh" release >/dev/null
fi
moonserve="$root/build/moonserve"
# Debian's uvicorn lives in Debian's Python, whatever python3 is first on PATH.
py=/usr/bin/python3

for p in $PINS; do
  case "$p" in none|split|contended) ;;
    *) echo "bench: PINS entries must be none, split or contended" >&2; exit 2 ;; esac
done
# set_pin PIN: the command prefixes for the servers and for wrk.
set_pin() {
  case "$1" in
    none)  server_pin=(); wrk_pin=() ;;
    split|contended) server_pin=(taskset -c 1); wrk_pin=(taskset -c 0) ;;
  esac
  wrk_threads="$(threads_for "$1")"
}
# threads_for PIN: wrk's threads under that pinning. More threads than the CPUs wrk has would
# time-slice among themselves, and a response that arrives for a descheduled thread waits out
# the other's slice: the latency measured would be wrk's own (two threads on CPU 0 put 3-4 ms
# into the p99 of the fastest server, and none into a slower one that left wrk idle time).
threads_for() {
  if [ -n "$THREADS" ]; then echo "$THREADS"
  elif [ "$1" = none ]; then nproc
  else echo 1
  fi
}
server_pin=(); wrk_pin=(); wrk_threads=1
# Under callgrind a server is wrapped in valgrind; empty for the timed runs.
wrap=()

moddir=""
for d in /usr/lib/nginx/modules /usr/share/nginx/modules; do
  if [ -f "$d/ngx_http_lua_module.so" ]; then moddir="$d"; break; fi
done
if [ -z "$moddir" ]; then
  echo "bench: ngx_http_lua_module.so not found under /usr/lib/nginx/modules" >&2; exit 1
fi
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
haproxy_bin="$(command -v haproxy || echo /usr/sbin/haproxy)"

tmp="$(mktemp -d /tmp/moonserve-bench.XXXXXX)"
pids=()
hog_pid=""
cleanup() {
  local p
  [ -z "$hog_pid" ] || kill "$hog_pid" 2>/dev/null || true
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -n "${INSTR_KEEP:-}" ] && [ -d "$tmp/cg" ]; then mkdir -p "$INSTR_KEEP" && cp "$tmp"/cg/* "$INSTR_KEEP"/; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stop one server this script started (and wait for it, so the next one gets quiet CPUs).
stop() {
  local p="$1" q=()
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  for x in "${pids[@]}"; do [ "$x" = "$p" ] || q+=("$x"); done
  pids=("${q[@]}")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_url URL LOGFILE PID: until URL answers 200 (at most 10 s; 120 s under callgrind).
wait_url() {
  local tries=100
  [ ${#wrap[@]} -eq 0 ] || tries=1200
  for _ in $(seq "$tries"); do
    if curl -fs -o /dev/null "$1"; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "bench: server for $1 did not become ready; log:" >&2
  cat "$2" >&2 || true
  return 1
}

# to_ms VALUE-WITH-UNIT (wrk prints us, ms or s).
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else { print "nan" } }'
}

# tree PID...: the pids and all their descendants (nginx workers, moonserve replicas).
tree() {
  local p
  for p in "$@"; do
    kill -0 "$p" 2>/dev/null || continue
    echo "$p"
    # shellcheck disable=SC2046
    tree $(pgrep -P "$p" || true)
  done
}

# cpu_ticks PID...: user + system clock ticks used so far (fields 14 and 15 of /proc/PID/stat,
# counted after the parenthesised command name, which may hold spaces).
cpu_ticks() {
  local p t=0 f
  for p in "$@"; do
    f="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null)" || continue
    t=$((t + $(awk '{print $12 + $13}' <<<"$f")))
  done
  echo "$t"
}

# status_sum PATTERN PID...: the values of the /proc/PID/status lines matching PATTERN, summed
# over the processes: VmRSS (resident KiB), ctxt_switches (voluntary + involuntary context
# switches: how often the servers sleep and wake; waking for fewer requests at a time costs more
# CPU per request).
status_sum() {
  local pattern="$1" p t=0 v
  shift
  for p in "$@"; do
    v="$(awk -v re="$pattern" '$1 ~ re {s += $2} END {print s + 0}' "/proc/$p/status" 2>/dev/null)" || continue
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# steal_sample: "steal total idle" jiffies over all CPUs (the aggregate cpu line of /proc/stat;
# idle counts iowait too).
steal_sample() {
  awk '/^cpu / {print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6}' /proc/stat
}
# children_ticks: user + system ticks of this shell's waited-for children (fields 16 and 17 of
# /proc/$$/stat), read with a builtin so that no child of its own is counted: around a wrk run,
# the difference is wrk's CPU.
children_ticks() {
  local f
  read -r -a f < "/proc/$$/stat"
  echo $((f[15] + f[16]))
}

failed=0
results=()   # "pin|label|connections|rps|p50|p99|errors|steal%|cpu us/request|rss MiB|idle%|wrk us/request|switches/request"
pin=none
hz="$(getconf CLK_TCK)"

# measure LABEL URL CONNS PID...: for each connection count in CONNS, warm-up, then the timed run
# with steal, CPU and memory of the given server processes (and their descendants) around it.
measure() {
  local label="$1" url="$2" conns="$3" out body c
  shift 3
  body="$(curl -fs "$url")" || { echo "bench: $label: request failed" >&2; failed=1; return 1; }
  if [ "$body" != ok ]; then
    echo "bench: $label: unexpected body '$body'" >&2; failed=1; return 1
  fi
  for c in $conns; do
    local hog=""
    if [ "$pin" = contended ]; then
      taskset -c 1 sh -c 'while :; do :; done' &
      hog=$!
      hog_pid=$hog # the exit trap stops it if the run fails
    fi
    if [ "$WARMUP" != 0 ]; then
      "${wrk_pin[@]}" wrk -t"$wrk_threads" -c"$c" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
    fi
    echo "bench: [$pin] $label: wrk -t$wrk_threads -c$c -d${DURATION}s --latency $url" >&2
    local procs s0 s1 t0 t1 w0 w1 x0 x1
    mapfile -t procs < <(tree "$@")
    x0="$(status_sum ctxt_switches: "${procs[@]}")"
    s0="$(steal_sample)"; t0="$(cpu_ticks "${procs[@]}")"; w0="$(children_ticks)"
    if ! out="$("${wrk_pin[@]}" wrk -t"$wrk_threads" -c"$c" -d"${DURATION}s" --latency "$url" 2>&1)"; then
      if [ -n "$hog" ]; then kill "$hog"; wait "$hog" 2>/dev/null || true; hog_pid=""; fi
      echo "$out" >&2; echo "bench: $label: wrk failed" >&2; failed=1; return 1
    fi
    w1="$(children_ticks)"; s1="$(steal_sample)"; t1="$(cpu_ticks "${procs[@]}")"
    x1="$(status_sum ctxt_switches: "${procs[@]}")"
    if [ -n "$hog" ]; then kill "$hog"; wait "$hog" 2>/dev/null || true; hog_pid=""; fi
    local rps p50 p99 non2xx errs n steal cpu rss idle wrk_cpu switches
    rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
    p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
    p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
    n="$(awk '/requests in/ {print $1}' <<<"$out")"
    non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")"
    errs="$(awk '/Socket errors:/ {sub(/.*Socket errors: /, ""); gsub(/ /, ""); print}' <<<"$out")"
    if [ -z "$rps" ] || [ -z "$p50" ] || [ -z "$p99" ] || [ -z "$n" ]; then
      echo "$out" >&2; echo "bench: $label: could not parse wrk output" >&2; failed=1; return 1
    fi
    if [ -n "$non2xx" ] && [ "$non2xx" != 0 ]; then
      echo "$out" >&2; echo "bench: $label: $non2xx non-2xx responses" >&2; failed=1; return 1
    fi
    steal="$(awk -v a="$s0" -v b="$s1" 'BEGIN { split(a, x, " "); split(b, y, " ");
      d = y[2] - x[2]; printf "%.1f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }')"
    cpu="$(awk -v t="$((t1 - t0))" -v hz="$hz" -v n="$n" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
    rss="$(awk -v k="$(status_sum ^VmRSS: "${procs[@]}")" 'BEGIN { printf "%.1f", k / 1024 }')"
    idle="$(awk -v a="$s0" -v b="$s1" 'BEGIN { split(a, x, " "); split(b, y, " ");
      d = y[2] - x[2]; printf "%.1f", (d > 0 ? 100 * (y[3] - x[3]) / d : 0) }')"
    wrk_cpu="$(awk -v t="$((w1 - w0))" -v hz="$hz" -v n="$n" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')"
    switches="$(awk -v x="$((x1 - x0))" -v n="$n" 'BEGIN { printf "%.3f", x / n }')"
    results+=("$pin|$label|$c|$rps|$(to_ms "$p50")|$(to_ms "$p99")|${errs:-none}|$steal|$cpu|$rss|$idle|$wrk_cpu|$switches")
  done
}

# --- moonserve -------------------------------------------------------------------------------
cp "$here/noop.lua" "$tmp/noop.lua"
reloads_ok=0
reloads_failed=0

# reload_loop ADMIN_PORT: POST /api/v1/reload every 100 ms until killed; counts answers in files.
reload_loop() {
  local code
  while :; do
    code="$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$1/api/v1/reload")"
    if [ "$code" = 200 ]; then echo >> "$tmp/reloads-ok"; else echo >> "$tmp/reloads-failed"; fi
    sleep 0.1
  done
}

# measure_reloading LABEL URL ADMIN_PORT PID: measure while reloading every 100 ms.
measure_reloading() {
  : > "$tmp/reloads-ok"; : > "$tmp/reloads-failed"
  reload_loop "$3" &
  local loop=$!
  measure "$1" "$2" "$ratio_conns" "$4" || true
  kill "$loop" 2>/dev/null || true
  wait "$loop" 2>/dev/null || true
  reloads_ok=$(wc -l < "$tmp/reloads-ok")
  reloads_failed=$(wc -l < "$tmp/reloads-failed")
}

# Each start_* starts one system's processes (under "${wrap[@]}" when set), waits until it
# serves, and sets url and started (the pids to stop, front first); it returns 1 if it did not
# come up.
start_moonserve() {
  local n="$1" port admin pid
  port="$(free_port)"
  admin="$(free_port)"
  sed -e "s/@PORT@/$port/" -e "s/@ADMIN_PORT@/$admin/" -e "s/@REPLICAS@/$n/" \
    "$here/moonserve.yaml.in" > "$tmp/moonserve-$n.yaml"
  "${server_pin[@]}" "${wrap[@]}" "$moonserve" run "$tmp/moonserve-$n.yaml" \
    > "$tmp/moonserve-$n.log" 2>&1 &
  pid=$!; pids+=("$pid"); started=("$pid")
  url="http://127.0.0.1:$port/"; admin_port="$admin"
  wait_url "http://127.0.0.1:$port/-/healthz" "$tmp/moonserve-$n.log" "$pid" || return 1
  # healthz answers once the controller is up; wait for every replica to report ready.
  for _ in $(seq 1200); do
    grep -q "ready ($n of $n running)" "$tmp/moonserve-$n.log" && return 0
    sleep 0.1
  done
  echo "bench: moonserve-${n}r replicas not ready; log:" >&2; cat "$tmp/moonserve-$n.log" >&2
  return 1
}

user_line=""
if [ "$(id -u)" -eq 0 ]; then user_line="user root;"; fi
# fill TEMPLATE OUT PORT: the @...@ placeholders of a peer's config template.
fill() {
  sed -e "s|@DIR@|$tmp|g" -e "s|@MODDIR@|$moddir|g" -e "s|@PORT@|$3|g" \
      -e "s|@USER@|$user_line|" "$here/$1" > "$tmp/$2"
}

# start_backend: the nginx+Lua backend on $tmp/backend.sock shared by the nginx and HAProxy fronts.
start_backend() {
  rm -f "$tmp/backend.sock"
  fill nginx-backend.conf.in nginx-backend.conf 0
  "${server_pin[@]}" "${wrap[@]}" "$nginx_bin" -p "$tmp" -e "$tmp/backend-error.log" \
    -c "$tmp/nginx-backend.conf" > "$tmp/nginx-backend.out" 2>&1 &
  backend=$!; pids+=("$backend")
}

# wait_front NAME PORT PID: until the front answers, with the backend's logs on failure.
wait_front() {
  if wait_url "http://127.0.0.1:$2/" "$tmp/$1.out" "$3"; then
    url="http://127.0.0.1:$2/"; started=("$3" "$backend"); return 0
  fi
  cat "$tmp"/*-error.log "$tmp/nginx-backend.out" >&2 || true
  started=("$3" "$backend"); return 1
}

start_nginx() {
  local port; port="$(free_port)"
  start_backend
  fill nginx-proxy.conf.in nginx-proxy.conf "$port"
  "${server_pin[@]}" "${wrap[@]}" "$nginx_bin" -p "$tmp" -e "$tmp/proxy-error.log" \
    -c "$tmp/nginx-proxy.conf" > "$tmp/nginx-proxy.out" 2>&1 &
  pids+=("$!")
  wait_front nginx-proxy "$port" "$!"
}

start_haproxy() {
  local port; port="$(free_port)"
  start_backend
  fill haproxy.cfg.in haproxy.cfg "$port"
  for _ in $(seq 1200); do [ -S "$tmp/backend.sock" ] && break; sleep 0.1; done
  "${server_pin[@]}" "${wrap[@]}" "$haproxy_bin" -db -f "$tmp/haproxy.cfg" > "$tmp/haproxy.out" 2>&1 &
  pids+=("$!")
  wait_front haproxy "$port" "$!"
}

start_asgi() {
  local port rep; port="$(free_port)"
  rm -f "$tmp/asgi.sock"
  "${server_pin[@]}" "${wrap[@]}" "$py" -m uvicorn --app-dir "$here" asgi_replica:app \
    --uds "$tmp/asgi.sock" --no-access-log --log-level warning > "$tmp/asgi-replica.out" 2>&1 &
  rep=$!; pids+=("$rep")
  for _ in $(seq 1200); do [ -S "$tmp/asgi.sock" ] && break; sleep 0.1; done
  ASGI_REPLICA_SOCK="$tmp/asgi.sock" "${server_pin[@]}" "${wrap[@]}" "$py" -m uvicorn \
    --app-dir "$here" asgi_proxy:app --host 127.0.0.1 --port "$port" --no-access-log \
    --log-level warning > "$tmp/asgi-proxy.out" 2>&1 &
  pids+=("$!"); started=("$!" "$rep")
  url="http://127.0.0.1:$port/"
  wait_url "$url" "$tmp/asgi-proxy.out" "$!" || { cat "$tmp/asgi-replica.out" >&2; return 1; }
}

stop_started() {
  local p
  for p in "${started[@]}"; do stop "$p"; done
}

# run_system NAME: every timed row of one system in the current pinning.
run_system() {
  local n
  case "$1" in
    moonserve)
      for n in $REPLICAS; do
        if start_moonserve "$n"; then
          measure "moonserve-${n}r" "$url" "$CONNECTIONS" "${started[@]}" || true
          if [ "$RELOAD_ROW" = 1 ] && [ "$n" = 1 ]; then
            measure_reloading "moonserve-1r-reload" "$url" "$admin_port" "${started[0]}"
          fi
        else
          failed=1
        fi
        stop_started
      done ;;
    nginx|haproxy|asgi)
      if "start_$1"; then measure "$1" "$url" "$CONNECTIONS" "${started[@]}" || true; else failed=1; fi
      stop_started ;;
    *) echo "bench: unknown system $1" >&2; exit 2 ;;
  esac
}

# Rounds alternate the systems within each pinning, so slow drift in the machine's load (steal
# on this VM moves by tens of percent) hits every system alike.
declare -A pin_started
for pin in $PINS; do
  set_pin "$pin"
  pin_started[$pin]="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  for _ in $(seq "$ROUNDS"); do
    for s in $SYSTEMS; do run_system "$s"; done
  done
done

# --- instructions per request (callgrind) ------------------------------------------------------
# Every server process runs under callgrind (children traced: moonserve's replicas are spawned
# with exec); after a warm-up of 2000 requests the counters are zeroed, a fixed count of
# INSTR_REQUESTS requests is sent (wrk stops after that many answers), and the counters dumped.
# Servers on CPU 1, wrk on CPU 0 with 1 thread and the first CONNECTIONS value.
instr=()   # "label|process|instructions|requests"
# count_fixed URL N: send N requests, print the count wrk saw answered.
count_fixed() {
  local w
  rm -f "$tmp/wrk-done"
  WRK_REQUESTS="$2" WRK_DONE="$tmp/wrk-done" "${wrk_pin[@]}" wrk -t1 -c"$ratio_conns" -d600s \
    -s "$here/fixed.lua" "$1" > "$tmp/wrk-fixed.out" 2>&1 &
  w=$!
  while [ ! -e "$tmp/wrk-done" ] && kill -0 "$w" 2>/dev/null; do sleep 0.1; done
  kill -INT "$w" 2>/dev/null || true
  wait "$w" || true
  awk '/requests in/ {print $1}' "$tmp/wrk-fixed.out"
}
# roles LABEL: the names of the processes in started[], front first.
roles() {
  case "$1" in
    moonserve-1r) echo controller replica ;;
    nginx) echo "nginx-proxy nginx-backend" ;;
    haproxy) echo "haproxy nginx-backend" ;;
    asgi) echo "uvicorn-proxy uvicorn-replica" ;;
  esac
}
run_instr() {
  local label="$1" p got dump name
  mkdir -p "$tmp/cg"
  wrap=(valgrind --tool=callgrind --trace-children=yes "--callgrind-out-file=$tmp/cg/$label.%p")
  case "$label" in
    moonserve-1r) start_moonserve 1 ;;
    *) "start_$label" ;;
  esac || { failed=1; stop_started; wrap=(); return; }
  wrap=()
  count_fixed "$url" 2000 >/dev/null
  # name:pid for every process: a started pid under its role, its descendants (nginx's worker,
  # moonserve's replicas) under the role's worker name.
  local role_names i=0 q procs=()
  read -r -a role_names <<<"$(roles "$label")"
  for p in "${started[@]}"; do
    procs+=("${role_names[$i]}:$p")
    # shellcheck disable=SC2046
    for q in $(tree $(pgrep -P "$p" || true)); do
      case "$label" in moonserve-1r) procs+=("replica:$q") ;; *) procs+=("${role_names[$i]}-worker:$q") ;; esac
    done
    i=$((i + 1))
  done
  for p in "${procs[@]}"; do callgrind_control -z "${p#*:}" >/dev/null 2>&1 || true; done
  echo "bench: callgrind $label: $INSTR_REQUESTS requests" >&2
  got="$(count_fixed "$url" "$INSTR_REQUESTS")"
  if [ -z "$got" ] || [ "$got" = 0 ]; then
    cat "$tmp/wrk-fixed.out" >&2; echo "bench: callgrind $label: wrk failed" >&2
    failed=1; stop_started; return
  fi
  for p in "${procs[@]}"; do
    name="${p%%:*}"; p="${p#*:}"
    callgrind_control -d "$p" >/dev/null 2>&1 || true
    dump=""
    for _ in $(seq 100); do
      dump="$(ls "$tmp/cg/$label.$p".* 2>/dev/null | head -1)"
      [ -n "$dump" ] && break; sleep 0.1
    done
    if [ -z "$dump" ]; then echo "bench: callgrind $label: no dump from pid $p" >&2; failed=1; continue; fi
    instr+=("$label|$name|$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")|$got")
  done
  stop_started
}
if [ "$INSTR" = 1 ]; then
  pin="split"; set_pin split
  for s in $INSTR_SYSTEMS; do
    case "$s" in moonserve) run_instr moonserve-1r ;; *) run_instr "$s" ;; esac
  done
fi

# --- report ----------------------------------------------------------------------------------
# median PIN LABEL CONNS FIELD: the median over rounds of one column (4 = requests/s, 5 = p50,
# 6 = p99, 8 = steal, 9 = CPU µs per request, 10 = RSS, 11 = idle, 12 = wrk's CPU µs per request,
# 13 = the servers' context switches per request).
median() {
  printf '%s\n' "${results[@]}" |
    awk -F'|' -v p="$1" -v l="$2" -v c="$3" -v f="$4" '$1 == p && $2 == l && $3 == c {print $f}' |
    sort -g |
    awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'
}
labels=()
for s in $SYSTEMS; do
  if [ "$s" = moonserve ]; then
    for n in $REPLICAS; do labels+=("moonserve-${n}r"); done
    if [ "$RELOAD_ROW" = 1 ] && [[ " $REPLICAS " == *" 1 "* ]]; then labels+=("moonserve-1r-reload"); fi
  else
    labels+=("$s")
  fi
done
row_fmt='%-20s %5s %11.0f %9.3f %9.3f %7.1f %8.1f %8.1f %6.1f %8.1f %6.3f  %s\n'
head_fmt='%-20s %5s %11s %9s %9s %7s %8s %8s %6s %8s %6s  %s\n'
for pin in $PINS; do
  echo
  echo "moonserve bench: started ${pin_started[$pin]}, $(nproc) CPUs, ${DURATION}s per run after ${WARMUP}s warm-up, $(threads_for "$pin") wrk thread(s), $ROUNDS round(s), pinning: $pin, loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
  printf "$head_fmt" system conns "requests/s" "p50 ms" "p99 ms" "steal%" "cpu us/r" "rss MiB" \
    "idle%" "wrk us/r" "csw/r" "socket errors"
  for r in "${results[@]}"; do
    IFS='|' read -r p label c rps p50 p99 errs steal cpu rss idle wrk_cpu switches <<<"$r"
    [ "$p" = "$pin" ] || continue
    printf "$row_fmt" "$label" "$c" "$rps" "$p50" "$p99" "$steal" "$cpu" "$rss" "$idle" "$wrk_cpu" \
      "$switches" "$errs"
  done
  if [ "$ROUNDS" -gt 1 ]; then
    echo "median over $ROUNDS rounds:"
    for c in $CONNECTIONS; do
      for l in "${labels[@]}"; do
        [ -n "$(median "$pin" "$l" "$c" 4)" ] || continue
        printf "$row_fmt" "$l" "$c" "$(median "$pin" "$l" "$c" 4)" "$(median "$pin" "$l" "$c" 5)" \
          "$(median "$pin" "$l" "$c" 6)" "$(median "$pin" "$l" "$c" 8)" \
          "$(median "$pin" "$l" "$c" 9)" "$(median "$pin" "$l" "$c" 10)" \
          "$(median "$pin" "$l" "$c" 11)" "$(median "$pin" "$l" "$c" 12)" \
          "$(median "$pin" "$l" "$c" 13)" ""
      done
    done
  fi
  for peer in nginx haproxy asgi; do
    peer_rps="$(median "$pin" "$peer" "$ratio_conns" 4)"
    [ -n "$peer_rps" ] || continue
    for l in "${labels[@]}"; do
      [[ "$l" == moonserve* ]] || continue
      rps="$(median "$pin" "$l" "$ratio_conns" 4)"
      [ -n "$rps" ] || continue
      awk -v l="$l" -v p="$peer" -v a="$rps" -v b="$peer_rps" -v c="$ratio_conns" -v pin="$pin" \
        'BEGIN { printf "ratio %s / %s (throughput, %s connections, pinning %s): %.2fx\n", l, p, c, pin, a / b }'
    done
  done
done
if [[ " ${labels[*]} " == *" moonserve-1r-reload "* ]]; then
  echo "reloads during moonserve-1r-reload (last run): $reloads_ok applied, $reloads_failed not"
  [ "$reloads_failed" = 0 ] || failed=1
fi
if [ ${#instr[@]} -gt 0 ]; then
  echo
  echo "instructions per request (callgrind, $INSTR_REQUESTS requests after 2000 warm-up, $ratio_conns connections, servers on CPU 1):"
  printf '%-14s %-24s %14s\n' system process "instr/request"
  for r in "${instr[@]}"; do
    IFS='|' read -r label name ins got <<<"$r"
    printf '%-14s %-24s %14.0f\n' "$label" "$name" "$(awk -v i="$ins" -v n="$got" 'BEGIN { print i / n }')"
  done
  printf '%s\n' "${instr[@]}" | awk -F'|' '{ t[$1] += $3 / $4; if (!($1 in o)) { o[$1] = ++k; n[k] = $1 } }
    END { for (i = 1; i <= k; i++) printf "%-14s %-24s %14.0f\n", n[i], "total", t[n[i]] }'
fi
exit "$failed"
