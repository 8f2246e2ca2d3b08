#!/usr/bin/env bash
# Configures and builds one flavour of moonserve: `release` (default) into build/, or
# `sanitize` (ASan+UBSan) into build-sanitize/.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
flavour="${1:-release}"
case "$flavour" in
  release)  dir="$root/build";          flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo) ;;
  sanitize) dir="$root/build-sanitize"; flags=(-DCMAKE_BUILD_TYPE=Debug -DMS_SANITIZE=ON) ;;
  *) echo "usage: build.sh [release|sanitize]" >&2; exit 2 ;;
esac
cmake -S "$root" -B "$dir" -DMS_WERROR=ON "${flags[@]}" >/dev/null
cmake --build "$dir" -j"$(nproc)"
