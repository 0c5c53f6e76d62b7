#!/usr/bin/env bash
# Installs Debian/Ubuntu packages with apt-get, as root or through sudo: what `ensure-lmdb.sh` and
# `ensure-jemalloc.sh` share. Tries the install first and refreshes the package index only when it
# fails (a fresh machine's index is empty; a recent one needs no refresh). Prints only what apt-get
# prints on failure.
#
# Usage: scripts/apt-install.sh [--no-prompt] package…
#   --no-prompt: use `sudo -n`, which fails instead of asking for a password (for optional packages).
# Exit status: 0 installed; 1 apt-get failed; 2 apt-get is not available; 3 root is needed and there
# is no sudo.
set -uo pipefail

sudo_flags=()
if [[ "${1:-}" == "--no-prompt" ]]; then
    sudo_flags=(-n)
    shift
fi

command -v apt-get >/dev/null 2>&1 || exit 2
as_root=()
if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || exit 3
    as_root=(sudo ${sudo_flags[@]+"${sudo_flags[@]}"})
fi

export DEBIAN_FRONTEND=noninteractive
install() { ${as_root[@]+"${as_root[@]}"} apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
install "$@" 2>/dev/null && exit 0
${as_root[@]+"${as_root[@]}"} apt-get update -qq || exit 1
install "$@" || exit 1
