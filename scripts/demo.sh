#!/usr/bin/env bash
# Runs the bank sample's demo on ./bank-data; arguments go to the demo
# (try `scripts/demo.sh --help`, or `scripts/demo.sh --keep` to run it again on the same data).
#
# Usage: scripts/demo.sh [demo options…]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/ensure-lmdb.sh
exec swift run BankSample demo "$@"
