#!/usr/bin/env bash
# Installs every Debian package moonserve needs to build, run and test, skipping those already
# present. Safe to run again. Needs root (or sudo) only when something is missing.
set -euo pipefail

packages=(
  build-essential cmake pkg-config git python3
  libuv1-dev node-llhttp libluajit2-5.1-dev libjansson-dev libyaml-dev libhiredis-dev
  libopenblas-dev redis-server wrk prometheus chromium
  python3-numpy python3-sklearn python3-torch
)
# Extra packages a caller asks for (the benchmark adds its peers: nginx and its Lua module,
# haproxy, python3-uvicorn with python3-uvloop and python3-httptools, and valgrind).
packages+=("$@")

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "bootstrap: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
