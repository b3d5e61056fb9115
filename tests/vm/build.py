#!/usr/bin/env python3
"""Builds the minimal VM that the power-cut test boots (tests/system/test_power_cut.py, through
tests/harness/vm.py) into tests/.work/vm/ (git-ignored):

- `vmlinuz`: Debian's cloud kernel, taken from its .deb (`apt-get download` + `dpkg-deb -x`), never
  installed on the host;
- `base.cpio`: an uncompressed newc initramfs with busybox (Debian's busybox-static), the kernel modules
  the VM needs (virtio_pci, virtio_blk, virtio_net and what their `.modinfo` says they depend on; ext4 is
  built into the cloud kernel, and is added with its dependencies if a kernel ever has it as a module),
  the release passerelled (stripped) and sqlite3 with the shared libraries `ldd` names, an /etc/passwd
  and /etc/group with the `passerelle` user (uid/gid 990), two CGI scripts for busybox httpd (status and
  spool rows, and a SIGTERM for the daemon) and the /init below.

The per-VM part (passerelled.toml, the PKI files, the guest ports) is a second small newc archive that
harness/vm.py appends to base.cpio: the kernel unpacks concatenated archives in order.

The kernel, its modules and busybox are cached under tests/.work/vm/cache/; base.cpio is rebuilt only
when passerelled, sqlite3, busybox, the kernel or this file change, so a second run costs a second or
two. Run it by hand to see what it does: `python3 tests/vm/build.py` (prints the paths it built).

Why no modules.dep: the .deb does not ship one (depmod writes it at install time, and kmod is not
needed on the host), so the dependencies are read from each module's `.modinfo` `depends=` field,
which is what depmod reads too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = REPO / "tests" / ".work" / "vm"
CACHE = WORK / "cache"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# What /init loads, in this order after their dependencies.
WANTED_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "ext4"]
PASSERELLE_UID = 990
GUEST_DICOM_PORT = 11112
GUEST_STATUS_PORT = 8081
GUEST_SPOOL = "/data/spool"
GUEST_CONFIG = "/etc/passerelle/passerelled.toml"

INIT = r"""#!/bin/sh
# /init of the power-cut test VM (tests/vm/build.py). Everything it prints goes to ttyS0, which QEMU
# appends to the gateway's log file on the host.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "vm-init: $*"; }
die() { say "$*"; say "powering off"; poweroff -f; }
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done
. /etc/vm.env
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 || die "eth0 is missing (virtio_net)"
ip link set eth0 up
ip route add default via 10.0.2.2
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1)); [ $n -gt 100 ] && die "/dev/vda did not appear (virtio_blk)"; sleep 0.1
done
mkdir -p /data
mount -t ext4 -o "$SPOOL_MOUNT_OPTIONS" /dev/vda /data || die "cannot mount the spool disk /dev/vda"
dmesg | grep 'EXT4-fs (vda)' | sed 's/^/vm-init: kernel: /'
mkdir -p __SPOOL__
chown passerelle:passerelle __SPOOL__
chmod 700 __SPOOL__
httpd -p "0.0.0.0:$GUEST_STATUS_PORT" -h /www || die "busybox httpd did not start"
say "boot $(cat /proc/uptime | cut -d' ' -f1) s after the kernel started; starting passerelled"
export RUST_LOG=info RUST_BACKTRACE=1 RUST_LOG_STYLE=never
passerelled --config __CONFIG__
code=$?
say "passerelled exited with code $code"
sync
umount /data && say "spool unmounted cleanly"
say "powering off"
poweroff -f
"""

# A negative control for the power-cut test: preloaded (LD_PRELOAD=/lib/nofsync.so in the VM's env), it
# turns every fsync family call into a no-op, so the daemon acknowledges instances that only live in the
# guest's page cache. The power-cut check must catch that (test_power_cut.py). Never preloaded otherwise.
NOFSYNC_C = r"""
#define _GNU_SOURCE
#include <sys/types.h>
int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
int syncfs(int fd) { (void)fd; return 0; }
void sync(void) {}
int sync_file_range(int fd, off_t o, off_t n, unsigned int f) { (void)fd; (void)o; (void)n; (void)f; return 0; }
int msync(void *a, size_t l, int f) { (void)a; (void)l; (void)f; return 0; }
"""

# CGI scripts, run by busybox httpd as root; queries run as the spool's owner (the daemon drops to
# `passerelle` after binding) so that SQLite never creates a -wal/-shm the daemon cannot open.
CGI_COMMON = r"""#!/bin/sh
owner=$(stat -c %U __SPOOL__/spool.db 2>/dev/null || echo root)
as_owner() { if [ "$owner" = root ]; then sh -c "$1"; else su -s /bin/sh "$owner" -c "$1"; fi; }
"""
CGI_STATUS = CGI_COMMON + r"""out=$(as_owner "passerelled status --json --config __CONFIG__ 2>&1")
if [ $? -eq 0 ]; then printf 'Status: 200 OK\r\nContent-Type: application/json\r\n\r\n%s\n' "$out"
else printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n%s\n' "$out"; fi
"""
CGI_ROWS = CGI_COMMON + r"""out=$(as_owner "sqlite3 -readonly -separator ' ' __SPOOL__/spool.db 'SELECT sop_instance_uid, state FROM instances' 2>&1")
if [ $? -eq 0 ]; then printf 'Status: 200 OK\r\nContent-Type: text/plain\r\n\r\n%s\n' "$out"
else printf 'Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n%s\n' "$out"; fi
"""
CGI_STOP = r"""#!/bin/sh
pid=$(pidof passerelled)
if [ -n "$pid" ] && kill -TERM $pid; then printf 'Status: 200 OK\r\n\r\nSIGTERM sent to %s\n' "$pid"
else printf 'Status: 409 Conflict\r\n\r\npasserelled is not running\n'; fi
"""


def log(msg: str) -> None:
    print(f"vm build: {msg}", file=sys.stderr)


def run(argv: list[str], **kw) -> str:
    cp = subprocess.run(argv, capture_output=True, text=True, **kw)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
    return cp.stdout


# -- newc cpio ------------------------------------------------------------------------------------


class Newc:
    """Writes a newc ("070701") cpio archive, the format the kernel's initramfs unpacker reads."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", uid: int = 0, gid: int = 0,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        fields = [self.ino, mode, uid, gid, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.f.write(head + b"\0" * (-len(head) % 4))
        self.f.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self._entry(d, 0o040000 | mode)

    def _parent(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.dir(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self.f.close()


# -- kernel, modules, busybox ---------------------------------------------------------------------


def kernel_package() -> str:
    """The versioned package the meta-package depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    out = run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if not m:
        raise RuntimeError(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel package:\n{out}")
    return m.group(1)


def _modinfo(ko: Path) -> dict[str, str]:
    data = ko.read_bytes()
    return {k.decode(): v.decode(errors="replace")
            for k, v in re.findall(rb"(?:^|\0)(name|depends)=([^\0]*)", data)}


def fetch_kernel() -> Path:
    """Downloads and unpacks the kernel once; returns its cache directory (vmlinuz, modules/, version)."""
    marker = CACHE / "kernel.json"
    if marker.exists():
        d = Path(json.loads(marker.read_text())["dir"])
        if (d / "vmlinuz").exists():
            return d
    pkg = kernel_package()
    d = CACHE / pkg
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as tmp:
        log(f"downloading {pkg} (apt-get download, not installed)")
        run(["apt-get", "download", pkg], cwd=tmp)
        deb = next(Path(tmp).glob("*.deb"))
        root = Path(tmp) / "x"
        run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = root / "lib" / "modules" / kver
        builtin = {Path(l).stem for l in (moddir / "modules.builtin").read_text().split()}
        by_name: dict[str, Path] = {}
        for ko in (moddir / "kernel").rglob("*.ko"):
            by_name[ko.stem.replace("-", "_")] = ko
        order: list[str] = []

        def need(name: str) -> None:
            name = name.replace("-", "_")
            if name in order or name in builtin:
                return
            if name not in by_name:
                raise RuntimeError(f"module {name} is neither built into {kver} nor shipped as a .ko")
            for dep in filter(None, _modinfo(by_name[name]).get("depends", "").split(",")):
                need(dep)
            order.append(name)

        for m in WANTED_MODULES:
            need(m)
        if d.exists():
            shutil.rmtree(d)
        (d / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz, d / "vmlinuz")
        for name in order:
            shutil.copy2(by_name[name], d / "modules" / f"{name}.ko")
        (d / "load-order").write_text("\n".join(order) + "\n")
        (d / "version").write_text(kver + "\n")
        log(f"kernel {kver}: modules {' '.join(order)} (built in: "
            f"{' '.join(m for m in WANTED_MODULES if m in builtin)})")
    marker.write_text(json.dumps({"dir": str(d)}))
    return d


def busybox() -> Path:
    """Debian's busybox-static binary (cached; it must be static: the initramfs has no libc for it)."""
    cached = CACHE / "busybox"
    if cached.exists():
        return cached
    src = Path("/bin/busybox")
    if not src.exists() or b"/lib64/ld-linux" in src.read_bytes()[:4096]:
        raise RuntimeError("/bin/busybox is missing or dynamic: install busybox-static (tests/setup.sh)")
    shutil.copy2(src, cached)
    return cached


def nofsync() -> Path:
    """The fsync no-op shim (cached), compiled with the host's gcc."""
    so = CACHE / "nofsync.so"
    src = CACHE / "nofsync.c"
    if not so.exists() or not src.exists() or src.read_text() != NOFSYNC_C:
        src.write_text(NOFSYNC_C)
        run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)])
    return so


def applets(bb: Path) -> list[str]:
    return run([str(bb), "--list"]).split()


def ldd_libs(binary: Path) -> list[Path]:
    out = run(["ldd", str(binary)])
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def passerelled_bin() -> Path:
    return Path(os.environ.get("PASSERELLED", REPO / "target" / "release" / "passerelled"))


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def build(passerelled: Path | None = None) -> tuple[Path, Path]:
    """(vmlinuz, base.cpio), built or taken from the cache."""
    WORK.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    passerelled = passerelled or passerelled_bin()
    if not passerelled.exists():
        raise RuntimeError(f"{passerelled} does not exist: run `cargo build --release -p passerelled` first")
    sqlite3 = Path(shutil.which("sqlite3") or "/usr/bin/sqlite3")
    if not sqlite3.exists():
        raise RuntimeError("sqlite3 is missing: run tests/setup.sh")
    kdir = fetch_kernel()
    bb = busybox()
    key = hashlib.sha256(
        "\n".join([_stamp(passerelled), _stamp(sqlite3), _stamp(bb), str(kdir),
                   Path(__file__).read_text()]).encode()
    ).hexdigest()
    base = WORK / "base.cpio"
    key_file = WORK / "base.cpio.key"
    if base.exists() and key_file.exists() and key_file.read_text() == key:
        return kdir / "vmlinuz", base

    log(f"building {base} with {passerelled}")
    tmp = base.with_suffix(".tmp")
    a = Newc(tmp)
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "data", "root",
              "lib/modules", "www/cgi-bin", "var/run"]:
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.chardev("dev/null", 1, 3, 0o666)
    a.file("bin/busybox", bb.read_bytes(), 0o755)
    for name in applets(bb):
        if name != "busybox":
            a.symlink(f"bin/{name}", "busybox")
    for name in (kdir / "load-order").read_text().split():
        a.file(f"lib/modules/{name}.ko", (kdir / "modules" / f"{name}.ko").read_bytes())
    a.file("lib/modules/load-order", (kdir / "load-order").read_bytes())
    with tempfile.TemporaryDirectory() as t:
        stripped = Path(t) / "passerelled"
        if shutil.which("strip"):
            run(["strip", "-o", str(stripped), str(passerelled)])
        else:
            shutil.copy2(passerelled, stripped)
        a.file("usr/bin/passerelled", stripped.read_bytes(), 0o755)
    a.file("usr/bin/sqlite3", sqlite3.read_bytes(), 0o755)
    a.file("lib/nofsync.so", nofsync().read_bytes(), 0o755)
    libs: dict[str, Path] = {}
    for b in (passerelled, sqlite3):
        for lib in ldd_libs(b):
            libs[str(lib)] = lib
    for name, lib in sorted(libs.items()):
        a.file(name, lib.resolve().read_bytes(), 0o755)
    a.file("etc/passwd", (f"root:x:0:0:root:/root:/bin/sh\n"
                          f"passerelle:x:{PASSERELLE_UID}:{PASSERELLE_UID}:Passerelle:/nonexistent:/bin/false\n").encode())
    a.file("etc/group", f"root:x:0:\npasserelle:x:{PASSERELLE_UID}:\n".encode())
    a.file("etc/hosts", b"127.0.0.1 localhost\n")
    a.file("etc/shadow", b"root:*:1::::::\npasserelle:!:1::::::\n", 0o600)
    sub = {"__SPOOL__": GUEST_SPOOL, "__CONFIG__": GUEST_CONFIG}

    def fill(s: str) -> bytes:
        for k, v in sub.items():
            s = s.replace(k, v)
        return s.encode()

    a.file("init", fill(INIT), 0o755)
    a.file("www/cgi-bin/status", fill(CGI_STATUS), 0o755)
    a.file("www/cgi-bin/rows", fill(CGI_ROWS), 0o755)
    a.file("www/cgi-bin/stop", fill(CGI_STOP), 0o755)
    a.close()
    tmp.replace(base)
    key_file.write_text(key)
    log(f"{base}: {base.stat().st_size // 1024} KiB")
    return kdir / "vmlinuz", base


if __name__ == "__main__":
    kernel, initrd = build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(kernel)
    print(initrd)
