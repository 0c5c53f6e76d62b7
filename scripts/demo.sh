#!/usr/bin/env bash
# Runs the demo sample in release mode; arguments go to the sample (try `scripts/demo.sh --help`).
#
# Usage: scripts/demo.sh [sample options…]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ensure-lmdb.sh
exec swift run -c release JournalDemo "$@"
