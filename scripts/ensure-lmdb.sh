#!/usr/bin/env bash
# Makes sure LMDB's C library and headers (Debian/Ubuntu package liblmdb-dev) and pkg-config are
# installed: the CLMDB target finds them through `pkg-config lmdb`. Installs them with apt-get
# when missing (as root, or through sudo); prints nothing when they are already there.
#
# Usage: scripts/ensure-lmdb.sh
set -euo pipefail

lmdb_present() {
    command -v pkg-config >/dev/null 2>&1 || return 1
    pkg-config --exists lmdb || return 1
    local includedir
    includedir="$(pkg-config --variable=includedir lmdb 2>/dev/null || true)"
    [[ -f "${includedir:-/usr/include}/lmdb.h" || -f /usr/include/lmdb.h ]]
}

if lmdb_present; then
    exit 0
fi

packages=(liblmdb-dev)
command -v pkg-config >/dev/null 2>&1 || packages+=(pkg-config)

echo "Installing ${packages[*]} with apt-get…" >&2
status=0
"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" "${packages[@]}" || status=$?
case $status in
    0) ;;
    2)
        echo "error: LMDB not found (pkg-config lmdb, lmdb.h) and apt-get is not available." >&2
        echo "       Install LMDB's development files and pkg-config with your package manager" >&2
        echo "       (Debian/Ubuntu: liblmdb-dev pkg-config; Fedora: lmdb-devel pkgconf; Homebrew: lmdb pkg-config)." >&2
        exit 1 ;;
    3)
        echo "error: LMDB not found, and installing liblmdb-dev needs root (no sudo available)." >&2
        echo "       As root, run: apt-get update && apt-get install -y liblmdb-dev pkg-config" >&2
        exit 1 ;;
    *)
        echo "error: installing ${packages[*]} with apt-get failed." >&2
        exit 1 ;;
esac

if ! lmdb_present; then
    echo "error: installed ${packages[*]}, but 'pkg-config --exists lmdb' or lmdb.h still fails." >&2
    exit 1
fi
echo "LMDB is installed: $(pkg-config --modversion lmdb 2>/dev/null || echo 'version unknown')." >&2
