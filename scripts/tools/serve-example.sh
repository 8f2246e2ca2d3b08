#!/usr/bin/env bash
# The README's first command: install what is missing, build, and serve examples/hello on
# http://127.0.0.1:8000 (or the config given as the first argument) in the foreground.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
"$root/scripts/tools/bootstrap.sh"
"$root/scripts/tools/build.sh" release
exec "$root/build/moonserve" run "${1:-$root/examples/hello/config.yaml}"
