#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite,
# first on the release build, then on the ASan+UBSan build.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
"$root/scripts/tools/bootstrap.sh"

"$root/scripts/tools/build.sh" release
ctest --test-dir "$root/build" --output-on-failure -j2

"$root/scripts/tools/build.sh" sanitize
# LuaJIT keeps its own allocator and exits replicas without closing the VM: leak reports from
# the replica processes would be noise, so leak checking is off; ASan still catches every
# out-of-bounds and use-after-free, and UBSan aborts on undefined behaviour.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$root/build-sanitize" --output-on-failure -j2
