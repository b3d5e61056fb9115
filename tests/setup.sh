#!/usr/bin/env bash
# Installs what the system tests and the demo need on a fresh Debian 12 machine. Run as root.
# Idempotent: safe to run again on a machine where everything is already installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/setup.sh must run as root (it installs Debian packages)." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the packaged Orthanc and nginx services from starting at install time: the tests start their own
# instances with their own configs on free loopback ports. (policy-rc.d is honoured by invoke-rc.d.)
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# gcc/libc6-dev: C code in Rust dependencies (SQLite bundled by rusqlite, ring).
# strace: the acknowledgement-order (power-cut precondition) test in test_crash_campaign.py.
# qemu-system-x86, busybox-static, sqlite3 (read in the guest): the power-cut test's VM (tests/vm/build.py).
# libfaketime: the daemon's wall clock set back while it runs, and only its clock (tests/system/test_clock.py).
packages=(dcmtk orthanc orthanc-dicomweb nginx openssl curl ca-certificates python3-pip gcc libc6-dev strace
          qemu-system-x86 busybox-static sqlite3 libfaketime)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    apt-get update
    apt-get install -y --no-install-recommends "${packages[@]}"
else
    echo "Debian packages already installed: ${packages[*]}"
fi

# If the packaged services run anyway (a machine set up earlier, with systemd), stop them so that they do not
# hold ports or files; failures are fine when there is no systemd.
for svc in orthanc nginx; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1; then
        service "$svc" stop >/dev/null 2>&1 || true
    fi
done

py=python3
if ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "python3 has no pip; install python3-pip." >&2
    exit 1
fi
if ! "$py" -m pip install --disable-pip-version-check -q -r "$here/requirements.txt" 2>/tmp/passerelle-pip.err; then
    if grep -q externally-managed-environment /tmp/passerelle-pip.err; then
        "$py" -m pip install --disable-pip-version-check -q --break-system-packages -r "$here/requirements.txt"
    else
        cat /tmp/passerelle-pip.err >&2
        exit 1
    fi
fi
# The daemon's account: started as root, passerelled switches to it (daemon.user), as on the box.
if ! id -u passerelle >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin passerelle
fi
echo "Test prerequisites are installed."
