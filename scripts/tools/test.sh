#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite,
# first on the release build, then on the ASan+UBSan build.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
"$root/scripts/tools/bootstrap.sh"

"$root/scripts/tools/build.sh" release
ctest --test-dir "$root/build" --output-on-failure -j2

"$root/scripts/tools/build.sh" sanitize
# Leak checking is on for the controller, the unit tests and the fuzz replays. Replica processes
# inherit this but never check (engine/cli/main.c, __lsan_is_turned_off): LuaJIT keeps its own
# allocator and replicas exit without closing the VM, so their reports would be noise. ASan
# catches every out-of-bounds and use-after-free, and UBSan aborts on undefined behaviour.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$root/build-sanitize" --output-on-failure -j2
