"""passerelled inside a QEMU VM whose spool is on a virtual disk, so that a test can pull the plug.

`VmGateway` has the interface of `harness.gateway.Gateway` that the crash campaign uses (`start`,
`wait_ready`, `running`, `proc`, `env`, `kill`, `stop`, `stop_ok`, `cleanup`, `status`, `port`,
`ae_title`, `log_path`, `log_excerpt`), so a campaign loop runs against either; the difference is what
`kill()` means: SIGKILL of the QEMU process, a power cut. Whatever the guest kernel held in its page cache
(written but not yet fsynced, the ext4 journal not yet committed) dies with QEMU; only what reached the
virtual disk survives, and the next `start()` boots the same disk, so ext4 replays its journal and
passerelled runs its recovery as after a real power loss.

The VM (built by `tests/vm/build.py`, cached under `tests/.work/vm/`): Debian's cloud kernel, an
initramfs with busybox, passerelled and sqlite3, and an /init that mounts the spool disk (`/dev/vda`,
ext4 made once by the host with mkfs.ext4 on a sparse raw file, mounted with ext4's defaults: `data=ordered`,
barriers on) on /data, starts busybox httpd for the host's status queries and runs passerelled as root,
which drops to the `passerelle` user (uid 990) after binding. Per-VM files (passerelled.toml with guest
paths, the PKI files, `/etc/vm.env` with `self.env` as exported variables) are a second small newc archive
appended to the initramfs.

Networking is QEMU's user mode (slirp): the guest is 10.0.2.15/24, the host is 10.0.2.2 and the guest's
connections to it land on the host's 127.0.0.1, so the uplink reaches nginx at `https://10.0.2.2:<port>`
with TLS verification on (the test PKI's server certificate carries IP:10.0.2.2). The host reaches the
guest through two forwards on 127.0.0.1: `port` → the DICOM port, `admin_port` → busybox httpd, whose CGI
scripts answer `passerelled status --json` (`status()`), the spool's `(SOP Instance UID, state)` rows
read with sqlite3 (`spool_rows()`), and send SIGTERM to passerelled (`stop()`); the daemon has no admin
HTTP API yet. The DICOM forward is added through QEMU's monitor (`hostfwd_add`) only when /init prints
`starting passerelled`: while the guest boots, an existing forward would accept a modality's connection
and hold it for seconds, where a refused connection lets the modality retry at once. When passerelled exits the guest syncs, unmounts the spool, prints
`vm-init: passerelled exited with code N` and powers off, so QEMU exits too: `running` is false once the
daemon is gone, as with `Gateway`.

The disk: `-drive file=spool.img,if=virtio,format=raw,cache=none,aio=threads`. With `cache=none` QEMU
opens the image with O_DIRECT: the host page cache is bypassed, so there is no second cache between the
guest and the file that would survive QEMU and hide lost guest writes, and the guest's flushes (fsync →
virtio FLUSH) become fdatasync on the host; what the guest had only in its own page cache dies with QEMU.
`aio=threads` works on every host file system that supports O_DIRECT (io_uring/native would need more).
What this does not model: a disk's own volatile write cache dropping writes that were submitted but not
yet flushed (here a write QEMU completed is in the host file); a power cut is at least this bad, so a
failure here is a real one.

The appliance image: when the image issue lands, it plugs in by overriding `boot_args()`: boot the image
(`-drive file=appliance.img,...` with its own kernel and init, the spool on its data partition or on a
second disk made like this one) instead of `-kernel vmlinuz -initrd initrd.cpio`, and keep the three
things this class relies on: the guest's log on ttyS0, the two port forwards (DICOM and the status/stop
HTTP endpoints), and the `starting passerelled` and `vm-init: passerelled exited with code N` lines. Everything
else (`kill()` as power cut, the campaign, the test) stays as it is.

When /dev/kvm cannot be opened, QEMU runs with TCG (much slower boots and I/O); the log says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import requests

from .gateway import AE_TITLE, REPO, passerelled_bin, toml_str, toml_value
from .orthanc import PASSWORD, USERNAME, Orthanc
from .pki import Pki
from .send import echoscu
from .util import free_port, start_process, tail, wait_until

QEMU = "qemu-system-x86_64"
HOST_FROM_GUEST = "10.0.2.2"
GUEST_PKI = PurePosixPath("/etc/passerelle/pki")


def _load_build():
    spec = importlib.util.spec_from_file_location("passerelle_vm_build", REPO / "tests" / "vm" / "build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


_accel: tuple[str, str] | None = None


def choose_accel(kernel: Path) -> tuple[str, str]:
    """("kvm" or "tcg", why). `$PASSERELLE_VM_ACCEL` (kvm/tcg) decides if set. Otherwise KVM is used if
    /dev/kvm can be opened *and* boots this kernel: a probe boots it with no init (the kernel panics,
    `panic=-1` + `-no-reboot` end QEMU) within 15 s. Nested KVM inside some cloud VMs opens fine and
    then hangs the guest in its decompressor; the probe catches that. The result is cached per host boot."""
    global _accel
    forced = os.environ.get("PASSERELLE_VM_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced, "$PASSERELLE_VM_ACCEL"
    if _accel is not None:
        return _accel
    if not kvm_available():
        _accel = ("tcg", "/dev/kvm cannot be opened")
        return _accel
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cache = build.WORK / "kvm-probe.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id and cached.get("kernel") == str(kernel):
            _accel = (cached["accel"], cached["why"])
            return _accel
    except (OSError, ValueError, KeyError):
        pass
    argv = [QEMU, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none", "-accel", "kvm",
            "-cpu", "max,-arch-capabilities", "-m", "256", "-serial", "stdio", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 rdinit=/none"]
    t0 = time.monotonic()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=15)
        ok = "Kernel panic" in cp.stdout
        why = (f"KVM probe booted the kernel in {time.monotonic() - t0:.1f} s" if ok
               else f"KVM probe failed (QEMU exit {cp.returncode}: {cp.stderr.strip()[-200:]})")
    except subprocess.TimeoutExpired:
        ok, why = False, "KVM probe: the guest did not boot within 15 s under /dev/kvm (nested virtualisation?)"
    _accel = ("kvm" if ok else "tcg", why)
    cache.write_text(json.dumps({"boot_id": boot_id, "kernel": str(kernel), "accel": _accel[0], "why": why}))
    return _accel


def guest_url(url: str) -> str:
    """The host's URL as the guest reaches it: localhost/127.0.0.1 become 10.0.2.2."""
    u = urllib.parse.urlsplit(url)
    if u.hostname not in ("localhost", "127.0.0.1"):
        return url
    netloc = HOST_FROM_GUEST + (f":{u.port}" if u.port else "")
    return urllib.parse.urlunsplit(u._replace(netloc=netloc))


@dataclass
class VmGateway:
    dir: Path
    stow_url: str  # as the host sees it; the guest's config gets guest_url(stow_url)
    ca_file: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str = ""
    password: str = ""
    ae_title: str = AE_TITLE
    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)  # host side of the DICOM forward
    admin_port: int = field(default_factory=free_port)  # host side of the status/stop forward
    extra_uplink: dict[str, object] = field(default_factory=dict)
    extra_dicom: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # exported in the guest before passerelled starts
    proc: subprocess.Popen | None = None  # the QEMU process
    starts: int = 0
    disk_mb: int = 1024
    memory_mb: int = 512
    cpus: int = 2
    monitor_port: int = field(default_factory=free_port)  # QEMU's HMP monitor on 127.0.0.1
    accel: str = ""  # "kvm" or "tcg", chosen at the first start (choose_accel)
    accel_why: str = ""
    forwarded: bool = False  # the DICOM forward exists for the current boot
    _forwarder: threading.Thread | None = None

    @property
    def config_path(self) -> Path:
        """The guest's passerelled.toml, as written on the host (it goes into the per-VM archive)."""
        return self.dir / "passerelled.toml"

    @property
    def spool_dir(self) -> PurePosixPath:
        """The spool directory inside the guest."""
        return PurePosixPath(build.GUEST_SPOOL)

    @property
    def spool_image(self) -> Path:
        return self.dir / "spool.img"

    @property
    def log_path(self) -> Path:
        """QEMU's own messages and the guest's serial console (kernel, /init, passerelled)."""
        return self.dir / "passerelled.log"


    # -- files ---------------------------------------------------------------------------------------

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        uplink = {"retry_base_secs": 1, "retry_max_secs": 4, "batch_max_instances": 50, **self.extra_uplink}
        lines = [
            "[dicom]",
            f"ae_title = {toml_str(self.ae_title)}",
            f'listen = "0.0.0.0:{build.GUEST_DICOM_PORT}"',
            f"allowed_calling_ae_titles = [{', '.join(toml_str(t) for t in self.allowed_calling_ae_titles)}]",
            *[f"{k} = {toml_value(v)}" for k, v in self.extra_dicom.items()],
            "",
            "[spool]",
            f"dir = {toml_str(build.GUEST_SPOOL)}",
            "min_free_mb = 64",
            "",
            "[uplink]",
            f"stow_url = {toml_str(guest_url(self.stow_url))}",
            f"ca_file = {toml_str(GUEST_PKI / 'ca.pem')}",
        ]
        if self.client_cert and self.client_key:
            lines += [f"client_cert = {toml_str(GUEST_PKI / 'client.pem')}",
                      f"client_key = {toml_str(GUEST_PKI / 'client.key')}"]
        if self.username:
            lines += [f"username = {toml_str(self.username)}", f"password = {toml_str(self.password)}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in uplink.items()]
        lines += ["", "[admin]", 'listen = "127.0.0.1:8080"', ""]
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def _make_disk(self) -> None:
        """A sparse raw file with ext4 on it, made once per gateway (every boot reuses it)."""
        if self.spool_image.exists():
            return
        tmp = self.spool_image.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.truncate(self.disk_mb * 1024 * 1024)
        # Initialise inode tables and journal now: no lazy-init writes in the guest during the campaign.
        cp = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "spool", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                             str(tmp)], capture_output=True, text=True, timeout=120)
        if cp.returncode != 0:
            raise AssertionError(f"mkfs.ext4 failed: {cp.stderr}")
        tmp.replace(self.spool_image)

    def _initrd(self) -> tuple[Path, Path]:
        """(kernel, initrd): the cached base archive followed by this VM's files."""
        kernel, base = build.build(passerelled_bin())
        extra = self.dir / "vm-extra.cpio"
        a = build.Newc(extra)
        a.file("etc/passerelle/passerelled.toml", self.config_path.read_bytes())
        files = {"ca.pem": self.ca_file}
        if self.client_cert and self.client_key:
            files |= {"client.pem": self.client_cert, "client.key": self.client_key}
        for name, src in files.items():
            a.file(str(GUEST_PKI / name).lstrip("/"), Path(src).read_bytes(), 0o644)
        env = {
            "GUEST_STATUS_PORT": str(build.GUEST_STATUS_PORT),
            "SPOOL_MOUNT_OPTIONS": "defaults",
            **self.env,
        }
        for k in env:
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k), f"not an environment variable name: {k!r}"
        a.file("etc/vm.env", "".join(f"export {k}='{v.replace(chr(39), '')}'\n" for k, v in env.items()).encode())
        a.close()
        initrd = self.dir / "initrd.cpio"
        with open(initrd, "wb") as out:
            for part in (base, extra):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        return kernel, initrd

    def boot_args(self, kernel: Path, initrd: Path) -> list[str]:
        """What QEMU boots; the appliance image replaces this (see the module docstring)."""
        return [
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off",
            "-drive", f"file={self.spool_image},if=virtio,format=raw,cache=none,aio=threads",
        ]  # fmt: skip

    def qemu_argv(self, kernel: Path, initrd: Path) -> list[str]:
        # -cpu max: "host" trips over MSRs (0x10a) that nested KVM does not let QEMU set.
        accel = ["-accel", "kvm", "-cpu", "max,-arch-capabilities"] if self.accel == "kvm" else ["-accel", "tcg"]
        # The DICOM forward is added through the monitor once /init starts passerelled (_forward_dicom):
        # a forward that exists while the guest boots accepts the modality's connection and holds it
        # until the guest's network answers, seconds later; without it the modality is refused at once.
        fwd = f"hostfwd=tcp:127.0.0.1:{self.admin_port}-:{build.GUEST_STATUS_PORT}"
        return [
            QEMU, "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            *accel, "-m", str(self.memory_mb), "-smp", str(self.cpus),
            "-chardev", f"file,id=console,path={self.log_path},append=on", "-serial", "chardev:console",
            "-monitor", f"tcp:127.0.0.1:{self.monitor_port},server=on,wait=off",
            "-netdev", f"user,id=net0,{fwd}", "-device", "virtio-net-pci,netdev=net0",
            *self.boot_args(kernel, initrd),
        ]  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> None:
        """Boots the VM (building or reusing its images); the daemon starts at the end of the boot."""
        if shutil.which(QEMU) is None:
            raise AssertionError(f"{QEMU} is missing: run tests/setup.sh as root first")
        assert not self.running, "the VM already runs"
        self.write_config()
        self._make_disk()
        kernel, initrd = self._initrd()
        if not self.accel:
            self.accel, self.accel_why = choose_accel(kernel)
        self.starts += 1
        self.forwarded = False
        argv = self.qemu_argv(kernel, initrd)
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(argv)} =====\n")
            if self.accel != "kvm":
                log.write(f"QEMU runs with TCG (emulation; boots and I/O are slower): {self.accel_why}\n")
        self.proc = start_process(argv, self.log_path)
        self._forwarder = threading.Thread(target=self._forward_dicom, args=(self.proc,), daemon=True,
                                           name=f"vm-forward-{self.port}")
        self._forwarder.start()
        if wait_ready:
            self.wait_ready()

    def _monitor(self, command: str) -> str:
        """One HMP command on QEMU's monitor; returns what QEMU answered."""
        with socket.create_connection(("127.0.0.1", self.monitor_port), timeout=10) as s:
            f = s.makefile("rwb")
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = f.read1(4096)
                if not chunk:
                    raise ConnectionError(f"QEMU's monitor closed: {buf!r}")
                buf += chunk
            f.write(command.encode() + b"\n")
            f.flush()
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = f.read1(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace")

    def _forward_dicom(self, proc: subprocess.Popen) -> None:
        """Adds the DICOM port forward once /init starts passerelled (runs in a thread per boot)."""
        while proc.poll() is None:
            if "starting passerelled" in self.boot_log():
                try:
                    answer = self._monitor(f"hostfwd_add net0 tcp:127.0.0.1:{self.port}-:{build.GUEST_DICOM_PORT}")
                except OSError as e:
                    answer = f"monitor error: {e!r}"
                if "rror" in answer or "fail" in answer:
                    with open(self.log_path, "a") as log:
                        log.write(f"harness: could not forward 127.0.0.1:{self.port} to the guest: {answer}\n")
                self.forwarded = True
                return
            time.sleep(0.05)  # polling the log file for /init's line (no event to wait on)

    def boot_log(self) -> str:
        """The log of the current (or last) boot."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        marker = f"===== start #{self.starts}:"
        i = text.rfind(marker)
        return text[i:] if i >= 0 else text

    def daemon_exit_code(self) -> int | None:
        m = re.search(r"vm-init: passerelled exited with code (\d+)", self.boot_log())
        return int(m.group(1)) if m else None

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> str:
            if not self.running:
                return "stopped"
            return "ready" if self.answers_echo() else ""

        try:
            state = wait_until(ready, timeout, f"passerelled in the VM to answer C-ECHO on 127.0.0.1:{self.port}",
                               interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_excerpt()}") from None
        if state == "stopped":
            code = self.proc.returncode if self.proc is not None else None
            raise AssertionError(f"the VM stopped during start-up (QEMU exit code {code}, passerelled exit "
                                 f"code {self.daemon_exit_code()})\n{self.log_excerpt()}")

    def answers_echo(self) -> bool:
        """C-ECHO through the forward, once /init has started passerelled (before that, slirp accepts the
        host connection and holds it while the guest boots, and echoscu would wait for its timeout)."""
        if not self.forwarded:
            return False
        return echoscu(self.port, self.ae_title, timeout=15).returncode == 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _http(self, path: str, timeout: float = 30) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to passerelled in the guest; the guest then syncs, unmounts and powers off. Returns the
        daemon's exit code (the caller asserts it is 0)."""
        assert self.proc is not None, "the VM was not started"
        if self.proc.poll() is None:
            try:
                self._http("/cgi-bin/stop", timeout=10)
            except requests.RequestException:
                pass  # the daemon is gone already and the guest is powering off
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"the VM did not power off within {timeout:.0f} s of SIGTERM to passerelled (power cut)\n"
                    f"{self.log_excerpt()}"
                ) from None
        self.proc = None
        code = self.daemon_exit_code()
        if code is None:
            raise AssertionError(f"the VM stopped without passerelled's exit code\n{self.log_excerpt()}")
        if "vm-init: spool unmounted cleanly" not in self.boot_log():
            raise AssertionError(f"the guest could not unmount the spool after passerelled exited\n{self.log_excerpt()}")
        return code

    def stop_ok(self, timeout: float = 60) -> None:
        code = self.stop(timeout)
        assert code == 0, f"passerelled exited with code {code} after SIGTERM, expected 0\n{self.log_excerpt()}"

    def kill(self) -> None:
        """Power cut: SIGKILL of QEMU. The guest's page cache and everything in flight are lost."""
        assert self.proc is not None, "the VM was not started"
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        """Ends the VM whatever its state (fixture finalizer): a clean stop if it can, else a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=20)
            except AssertionError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.proc = None

    def log_excerpt(self, lines: int = 80) -> str:
        return f"--- VM console ({self.log_path}), last {lines} lines ---\n{tail(self.log_path, lines)}"

    # -- queries -------------------------------------------------------------------------------------

    def status(self) -> dict:
        """`passerelled status --json` run in the guest (the daemon must be running)."""
        r = self._http("/cgi-bin/status")
        if r.status_code != 200:
            raise AssertionError(f"passerelled status in the VM failed ({r.status_code}): {r.text}")
        return json.loads(r.text)

    def spool_rows(self) -> dict[str, set[str]]:
        """SOP Instance UID -> the states of its rows in the guest's spool database."""
        r = self._http("/cgi-bin/rows")
        if r.status_code != 200:
            raise AssertionError(f"reading the spool rows in the VM failed ({r.status_code}): {r.text}")
        rows: dict[str, set[str]] = {}
        for line in r.text.splitlines():
            if line.strip():
                uid, state = line.split()
                rows.setdefault(uid, set()).add(state)
        return rows

    def fsck(self) -> subprocess.CompletedProcess:
        """`e2fsck -fn` of the spool disk (the VM must be stopped): a read-only full check."""
        assert not self.running, "fsck of a mounted disk"
        return subprocess.run(["e2fsck", "-fn", str(self.spool_image)], capture_output=True, text=True, timeout=120)


def vm_gateway_for(d: Path, orthanc: Orthanc, pki: Pki, **kw) -> VmGateway:
    """A VM gateway delivering to `orthanc` through its TLS front with mutual TLS and basic auth."""
    kw.setdefault("ca_file", pki.ca_cert)
    g = VmGateway(
        dir=d,
        stow_url=orthanc.stow_url,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        username=USERNAME,
        password=PASSWORD,
        **kw,
    )
    g.write_config()
    return g


def wait_boot_and_time(g: VmGateway, timeout: float = 60) -> float:
    """Boots `g` and returns the seconds until passerelled answered C-ECHO."""
    t0 = time.monotonic()
    g.start(wait_ready=False)
    g.wait_ready(timeout)
    return time.monotonic() - t0
