#!/usr/bin/env bash
# Builds everything (library, samples, benchmarks, tests) and runs the test suites.
# Extra arguments go to `swift test`, e.g. `scripts/test.sh --filter Journal`.
#
# Usage: scripts/test.sh [swift test options…]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ensure-lmdb.sh
scripts/ensure-jemalloc.sh  # optional: the benchmarks' allocator
swift build --build-tests
# Line-buffered output (stdbuf's setting is inherited by the test process), so that a log cut short
# by a hang or a kill names the test that was running.
stdbuf -oL -eL swift test --skip-build "$@"
