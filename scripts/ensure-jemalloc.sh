#!/usr/bin/env bash
# Best effort: makes sure jemalloc's development files (Debian/Ubuntu package libjemalloc-dev) are
# installed, so that the benchmarks link it (see Package.swift: the runtime's threads hand buffers to
# one another, which glibc's malloc serves poorly). Installs them with apt-get when missing (as root,
# or through sudo). Never fails: without jemalloc the benchmarks build on the system malloc, and
# every benchmark report says which one it ran on.
#
# Usage: scripts/ensure-jemalloc.sh
set -uo pipefail

jemalloc_present() {
    local dir
    for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
        [[ -e "$dir/libjemalloc.so" ]] && return 0
    done
    return 1
}

jemalloc_present && exit 0

note() { echo "note: $* The benchmarks will use the system malloc." >&2; exit 0; }

echo "Installing libjemalloc-dev with apt-get…" >&2
status=0
"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" --no-prompt libjemalloc-dev || status=$?
case $status in
    0) ;;
    2) note "jemalloc (libjemalloc-dev) is not installed and apt-get is not available." ;;
    3) note "jemalloc (libjemalloc-dev) is not installed, and installing it needs root." ;;
    *) note "installing libjemalloc-dev with apt-get failed." ;;
esac
jemalloc_present || note "installed libjemalloc-dev, but libjemalloc.so is still not found."
echo "jemalloc is installed." >&2
