#!/usr/bin/env bash
# Where the time goes on the no-op path: counts system calls per request in every server process
# (perf stat on syscall tracepoints, cheap enough not to change batching much) for moonserve with
# one replica and for the nginx proxy -> nginx+Lua backend pair, under the same wrk load as
# bench.sh; with PERF_RECORD=1 it also samples the moonserve controller and replica with
# `perf record -g` and prints their top symbols. Needs the release build and nginx (run bench.sh
# once first). Environment: DURATION (default 5), CONNECTIONS (default 64), THREADS (default 2),
# REPLICAS (moonserve's replicas, default 1).
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
here="$root/scripts/tools/bench"
DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
REPLICAS="${REPLICAS:-1}"
moddir=/usr/lib/nginx/modules
[ -f "$moddir/ngx_http_lua_module.so" ] || moddir=/usr/share/nginx/modules

tmp="$(mktemp -d /tmp/moonserve-profile.XXXXXX)"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_ok() {
  for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "profile: $1 not ready" >&2; return 1
}
events="task-clock,context-switches,raw_syscalls:sys_enter"
calls=(read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait accept4 close
       setsockopt getsockopt ioctl futex)
for c in "${calls[@]}"; do events+=",syscalls:sys_enter_$c"; done

# profile LABEL URL PID...: one wrk run with perf stat on each PID; prints syscalls per request.
profile() {
  local label="$1" url="$2"; shift 2
  local p i=0 stats=()
  for p in "$@"; do
    perf stat -x, -e "$events" -p "$p" -o "$tmp/stat-$label-$i.csv" -- sleep "$((DURATION + 1))" &
    stats+=("$!"); i=$((i + 1))
  done
  sleep 0.5
  local out reqs
  out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" "$url")"
  reqs="$(awk '/requests in/ {print $1}' <<<"$out")"
  for p in "${stats[@]}"; do wait "$p" || true; done
  echo "== $label: $reqs requests, $(awk '/^Requests\/sec:/ {print $2}' <<<"$out") req/s; per request (cpu_us = CPU time, ALL = all syscalls):"
  i=0
  for p in "$@"; do
    printf '  pid %-7s %-40s' "$p" "$(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-40)"
    awk -F, -v n="$reqs" '$3 == "task-clock" { printf " cpu_us=%.2f", $1 * 1000 / n; next }
        $3 == "context-switches" { printf " cswitch=%.2f", $1 / n; next }
        $1 ~ /^[0-9]+$/ && $1 > 0 {
        name = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", name); if (name == "") name = "ALL";
        printf " %s=%.2f", name, $1 / n } END { print "" }' "$tmp/stat-$label-$i.csv"
    i=$((i + 1))
  done
}

# moonserve, REPLICAS replicas
cp "$here/noop.lua" "$tmp/noop.lua"
port="$(free_port)"
admin="$(free_port)"
sed -e "s/@PORT@/$port/" -e "s/@ADMIN_PORT@/$admin/" -e "s/@REPLICAS@/$REPLICAS/" \
  "$here/moonserve.yaml.in" > "$tmp/ms.yaml"
"$root/build/moonserve" run "$tmp/ms.yaml" > "$tmp/ms.log" 2>&1 &
ctl=$!; pids+=("$ctl")
wait_ok "http://127.0.0.1:$port/"
for _ in $(seq 100); do [ "$(pgrep -c -P "$ctl")" -ge "$REPLICAS" ] && break; sleep 0.1; done
mapfile -t reps < <(pgrep -P "$ctl")
rep="${reps[0]}"
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null
profile "moonserve-${REPLICAS}r" "http://127.0.0.1:$port/" "$ctl" "${reps[@]}"
if [ "${PERF_RECORD:-0}" = 1 ]; then
  for p in "$ctl" "$rep"; do
    perf record -q -F 999 -g -p "$p" -o "$tmp/perf-$p.data" -- sleep "$((DURATION + 1))" 2>/dev/null &
  done
  sleep 0.5; wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$port/" >/dev/null
  wait "$(jobs -p | tail -1)" 2>/dev/null || true; sleep 1.5
  for p in "$ctl" "$rep"; do
    echo "== perf top symbols (self), pid $p ($( [ "$p" = "$ctl" ] && echo controller || echo replica))"
    perf report -i "$tmp/perf-$p.data" --no-children --sort sym --stdio 2>/dev/null \
      | grep -E "^ +[0-9.]+%" | head -25 || true
  done
fi
kill -TERM "$ctl"; wait "$ctl" 2>/dev/null || true; pids=()

# nginx proxy -> nginx+Lua backend
user_line=""; [ "$(id -u)" -eq 0 ] && user_line="user root;"
port="$(free_port)"
for f in backend proxy; do
  sed -e "s|@DIR@|$tmp|g" -e "s|@MODDIR@|$moddir|g" -e "s|@PORT@|$port|g" \
      -e "s|@USER@|$user_line|" "$here/nginx-$f.conf.in" > "$tmp/nginx-$f.conf"
  nginx -p "$tmp" -e "$tmp/$f-error.log" -c "$tmp/nginx-$f.conf" > "$tmp/nginx-$f.out" 2>&1 &
  pids+=("$!")
done
wait_ok "http://127.0.0.1:$port/"
bw="$(pgrep -P "${pids[-2]}" | head -1)"; pw="$(pgrep -P "${pids[-1]}" | head -1)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null
profile nginx "http://127.0.0.1:$port/" "$pw" "$bw"
