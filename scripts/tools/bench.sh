#!/usr/bin/env bash
# The first benchmark (docs/performance.md): wrk on loopback against moonserve serving a no-op Lua
# deployment (1 and 2 replicas) and, in the same run, against nginx reverse-proxying over a
# keep-alive Unix-socket pool to an nginx+Lua backend returning the same body. Prints requests/s,
# p50 and p99 for each system and the throughput ratio moonserve/nginx.
#
# Environment: DURATION (seconds per measurement, default 10), WARMUP (seconds, default 2),
# CONNECTIONS (default 64), THREADS (wrk threads, default 2), PIN (none|split, default none:
# every process unpinned; split: servers on CPU 1, wrk on CPU 0), REPLICAS (list, default "1 2"),
# ROUNDS (default 1; with more, medians are reported too), SKIP_BUILD=1 to use the existing
# build/moonserve, RELOAD_ROW (default 1: one more moonserve-1r run while every policy script is
# hot-reloaded every 100 ms through the admin API; 0 skips it).
#
# Exits non-zero only when a measurement fails (a server does not come up, wrk fails, or a
# response is not 2xx); never because of a ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/scripts/tools/bench"

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
PIN="${PIN:-none}"
REPLICAS="${REPLICAS:-1 2}"
ROUNDS="${ROUNDS:-1}"
RELOAD_ROW="${RELOAD_ROW:-1}"

"$root/scripts/tools/bootstrap.sh" nginx libnginx-mod-http-lua
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  "$root/scripts/tools/build.sh" release >/dev/null
fi
moonserve="$root/build/moonserve"

case "$PIN" in
  none)  server_pin=(); wrk_pin=() ;;
  split) server_pin=(taskset -c 1); wrk_pin=(taskset -c 0) ;;
  *) echo "bench: PIN must be none or split" >&2; exit 2 ;;
esac

moddir=""
for d in /usr/lib/nginx/modules /usr/share/nginx/modules; do
  if [ -f "$d/ngx_http_lua_module.so" ]; then moddir="$d"; break; fi
done
if [ -z "$moddir" ]; then
  echo "bench: ngx_http_lua_module.so not found under /usr/lib/nginx/modules" >&2; exit 1
fi
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

tmp="$(mktemp -d /tmp/moonserve-bench.XXXXXX)"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stop one server this script started (and wait for it, so the next one gets quiet CPUs).
stop() {
  local p="$1" q=()
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  for x in "${pids[@]}"; do [ "$x" = "$p" ] || q+=("$x"); done
  pids=("${q[@]}")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_url URL LOGFILE PID: until URL answers 200 (at most 10 s).
wait_url() {
  for _ in $(seq 100); do
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

failed=0
results=()   # "label|rps|p50|p99|errors"

# measure LABEL URL: warm-up, then the timed run; appends to results.
measure() {
  local label="$1" url="$2" out body
  body="$(curl -fs "$url")" || { echo "bench: $label: request failed" >&2; failed=1; return 1; }
  if [ "$body" != ok ]; then
    echo "bench: $label: unexpected body '$body'" >&2; failed=1; return 1
  fi
  if [ "$WARMUP" != 0 ]; then
    "${wrk_pin[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "$url" >/dev/null 2>&1 || true
  fi
  echo "bench: $label: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency $url" >&2
  if ! out="$("${wrk_pin[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url" 2>&1)"; then
    echo "$out" >&2; echo "bench: $label: wrk failed" >&2; failed=1; return 1
  fi
  echo "$out" > "$tmp/wrk-$label.txt"
  local rps p50 p99 non2xx errs
  rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
  p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
  p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
  non2xx="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")"
  errs="$(awk '/Socket errors:/ {sub(/.*Socket errors: /, ""); print}' <<<"$out")"
  if [ -z "$rps" ] || [ -z "$p50" ] || [ -z "$p99" ]; then
    echo "$out" >&2; echo "bench: $label: could not parse wrk output" >&2; failed=1; return 1
  fi
  if [ -n "$non2xx" ] && [ "$non2xx" != 0 ]; then
    echo "$out" >&2; echo "bench: $label: $non2xx non-2xx responses" >&2; failed=1; return 1
  fi
  results+=("$label|$rps|$(to_ms "$p50")|$(to_ms "$p99")|${errs:-none}")
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

# measure_reloading LABEL URL ADMIN_PORT: measure while reloading every 100 ms.
measure_reloading() {
  : > "$tmp/reloads-ok"; : > "$tmp/reloads-failed"
  reload_loop "$3" &
  local loop=$!
  measure "$1" "$2" || true
  kill "$loop" 2>/dev/null || true
  wait "$loop" 2>/dev/null || true
  reloads_ok=$(wc -l < "$tmp/reloads-ok")
  reloads_failed=$(wc -l < "$tmp/reloads-failed")
}

run_moonserve() {
  local n port admin pid
  for n in $REPLICAS; do
    port="$(free_port)"
    admin="$(free_port)"
    sed -e "s/@PORT@/$port/" -e "s/@ADMIN_PORT@/$admin/" -e "s/@REPLICAS@/$n/" \
      "$here/moonserve.yaml.in" > "$tmp/moonserve-$n.yaml"
    "${server_pin[@]}" "$moonserve" run "$tmp/moonserve-$n.yaml" > "$tmp/moonserve-$n.log" 2>&1 &
    pid=$!; pids+=("$pid")
    if wait_url "http://127.0.0.1:$port/-/healthz" "$tmp/moonserve-$n.log" "$pid"; then
      # healthz answers once the controller is up; wait for every replica to report ready.
      for _ in $(seq 100); do
        grep -q "ready ($n of $n running)" "$tmp/moonserve-$n.log" && break
        sleep 0.1
      done
      measure "moonserve-${n}r" "http://127.0.0.1:$port/" || true
      if [ "$RELOAD_ROW" = 1 ] && [ "$n" = 1 ]; then
        measure_reloading "moonserve-1r-reload" "http://127.0.0.1:$port/" "$admin"
      fi
    else
      failed=1
    fi
    stop "$pid"
  done
}

# --- nginx proxy -> nginx+Lua backend ----------------------------------------------------------
user_line=""
if [ "$(id -u)" -eq 0 ]; then user_line="user root;"; fi
run_nginx() {
  local f port backend proxy
  port="$(free_port)"
  for f in backend proxy; do
    sed -e "s|@DIR@|$tmp|g" -e "s|@MODDIR@|$moddir|g" -e "s|@PORT@|$port|g" \
        -e "s|@USER@|$user_line|" "$here/nginx-$f.conf.in" > "$tmp/nginx-$f.conf"
    "${server_pin[@]}" "$nginx_bin" -p "$tmp" -e "$tmp/$f-error.log" -c "$tmp/nginx-$f.conf" \
      > "$tmp/nginx-$f.out" 2>&1 &
    pids+=("$!")
    if [ "$f" = backend ]; then backend=$!; else proxy=$!; fi
  done
  if wait_url "http://127.0.0.1:$port/" "$tmp/nginx-proxy.out" "$proxy"; then
    measure nginx "http://127.0.0.1:$port/" || true
  else
    cat "$tmp"/*-error.log "$tmp/nginx-backend.out" >&2 || true
    failed=1
  fi
  stop "$proxy"; stop "$backend"
}

# Rounds alternate the systems, so slow drift in the machine's load hits both alike.
for round in $(seq "$ROUNDS"); do
  run_moonserve
  run_nginx
done

# --- report ----------------------------------------------------------------------------------
echo
echo "moonserve bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, ${DURATION}s per run after ${WARMUP}s warm-up, $CONNECTIONS connections, $THREADS wrk threads, $ROUNDS round(s), pinning: $PIN, loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-20s %12s %10s %10s  %s\n' system "requests/s" "p50 ms" "p99 ms" "socket errors"
for r in "${results[@]}"; do
  IFS='|' read -r label rps p50 p99 errs <<<"$r"
  printf '%-20s %12.0f %10.3f %10.3f  %s\n' "$label" "$rps" "$p50" "$p99" "$errs"
done
# median LABEL FIELD: the median over rounds of one column (2 = requests/s, 3 = p50, 4 = p99).
median() {
  printf '%s\n' "${results[@]}" | awk -F'|' -v l="$1" -v f="$2" '$1 == l {print $f}' | sort -g |
    awk '{ a[NR] = $1 } END { if (NR) print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'
}
labels=()
for n in $REPLICAS; do labels+=("moonserve-${n}r"); done
if [ "$RELOAD_ROW" = 1 ] && [[ " $REPLICAS " == *" 1 "* ]]; then
  labels+=("moonserve-1r-reload")
  echo "reloads during moonserve-1r-reload (last round): $reloads_ok applied, $reloads_failed not"
  [ "$reloads_failed" = 0 ] || failed=1
fi
if [ "$ROUNDS" -gt 1 ]; then
  echo "median over $ROUNDS rounds:"
  for l in "${labels[@]}" nginx; do
    [ -n "$(median "$l" 2)" ] || continue
    printf '%-20s %12.0f %10.3f %10.3f\n' "$l" "$(median "$l" 2)" "$(median "$l" 3)" "$(median "$l" 4)"
  done
fi
nginx_rps="$(median nginx 2)"
if [ -n "$nginx_rps" ]; then
  for l in "${labels[@]}"; do
    rps="$(median "$l" 2)"
    [ -n "$rps" ] || continue
    awk -v l="$l" -v a="$rps" -v b="$nginx_rps" \
      'BEGIN { printf "ratio %s / nginx (throughput): %.2fx\n", l, a / b }'
  done
fi
exit "$failed"
