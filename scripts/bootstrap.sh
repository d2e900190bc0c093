#!/usr/bin/env bash
# Install everything memvirt and its tests need on a Debian 12 host, idempotently:
# Debian packages (QEMU, busybox, a C toolchain for the guest programs, makedumpfile, libvirt),
# then a virtualenv in .venv with memvirt and its pinned Python dependencies.
# Guest kernels are downloaded on first use into ~/.cache/memvirt (never into the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static gcc libc6-dev make cpio kmod makedumpfile
              # arm64 guests (docs/support.md): QEMU for them and a cross compiler for their static programs
              qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross
              xz-utils zstd python3-venv python3-pip ca-certificates
              liblz4-dev libzstd-dev libxxhash-dev libssl-dev
              # libvirt 9.0 for libvirt:NAME domains (docs/libvirt.md). The -sysv flavour of
              # libvirt-daemon-system brings sysv init scripts instead of pulling in systemd-sysv
              # (these hosts do not run systemd as PID 1); libvirt-dev, pkg-config and python3-dev
              # let pip build the libvirt-python binding.
              libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients libvirt-daemon-driver-qemu
              libvirt-dev pkg-config python3-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: memvirt needs Python >= 3.11 (found $("$PY" --version))" >&2
    exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.memvirt-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
