"""The receivers under test, each started fresh for every measured run: passerelled and its peers
(dcmtk storescp with --ignore, with -od +B, with -od +B and fdatasync on each file, Orthanc with
SyncStorageArea), optionally with TCP_NODELAY forced through an LD_PRELOAD shim."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from harness.gateway import Gateway
from harness.orthanc import Orthanc
from harness.pki import Pki
from harness.send import STORESCP, echoscu
from harness.util import free_port, start_process, stop_process_group, wait_until

SHIM_SRC = Path(__file__).resolve().parent / "shims"


def build_shims(out: Path) -> dict[str, Path]:
    """Compiles the LD_PRELOAD shims with gcc: {"nodelay": ..., "fdatasync": ...}."""
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in ("nodelay", "fdatasync"):
        so = out / f"{name}.so"
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(SHIM_SRC / f"{name}.c"), "-ldl"],
                       check=True)
        built[name] = so
    return built


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def group_cpu_seconds(leader: int) -> float:
    """utime+stime of every process in `leader`'s process group (threads included), plus what the leader's
    reaped children used (cutime+cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is None or int(f[2]) != leader:
            continue
        total += int(f[11]) + int(f[12])
        if int(entry) == leader:
            total += int(f[13]) + int(f[14])
    return total / tick


def group_size(leader: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and int(f[2]) == leader:
                n += 1
    return n


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _preload(shims: list[Path]) -> dict[str, str]:
    return {"LD_PRELOAD": " ".join(str(s) for s in shims)} if shims else {}


class Receiver:
    """Base: `name`, `ae_title`, `port`; start(dir) / stop(); `pid` is the process group leader."""

    name = "?"
    ae_title = "BENCH"

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return group_cpu_seconds(self.pid)

    def settle(self, timeout: float = 5) -> None:
        """Waits until forked per-association children have exited (their CPU then counts in cutime)."""
        deadline = time.monotonic() + timeout
        while group_size(self.pid) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_echo(self, timeout: float = 30) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with code {self.proc.returncode} during start-up")
            return echoscu(self.port, self.ae_title).returncode == 0

        wait_until(ok, timeout, f"{self.name} to answer C-ECHO on port {self.port}", interval=0.1)

    def start(self, d: Path) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process_group(self.proc, signal.SIGTERM, timeout=30)
        self.proc = None


class StoreScp(Receiver):
    """dcmtk storescp, one forked process per association. mode: "ignore" | "files" | "fdatasync"."""

    ae_title = "STORESCP"

    def __init__(self, mode: str, shims: dict[str, Path], nodelay: bool) -> None:
        super().__init__()
        self.mode, self.nodelay = mode, nodelay
        label = {"ignore": "storescp --ignore", "files": "storescp -od +B", "fdatasync": "storescp -od +B fdatasync"}
        self.name = label[mode] + (" +NODELAY" if nodelay else "")
        self.preload = ([shims["nodelay"]] if nodelay else []) + ([shims["fdatasync"]] if mode == "fdatasync" else [])
        self.out: Path | None = None

    def start(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [STORESCP, "--fork", "-aet", self.ae_title]
        if self.mode == "ignore":
            argv.append("--ignore")
        else:
            self.out = d / "in"
            self.out.mkdir(exist_ok=True)
            argv += ["-od", str(self.out), "+B"]
        argv.append(str(self.port))
        self.proc = start_process(argv, d / "storescp.log", env={**os.environ, **_preload(self.preload)})
        self._wait_echo()


class OrthancScp(Receiver):
    """Orthanc's own DICOM port, SyncStorageArea on (durable like passerelled), no compression."""

    ae_title = "ORTHANC"

    def __init__(self, pki: Pki, shims: dict[str, Path], nodelay: bool) -> None:
        super().__init__()
        self.pki, self.nodelay = pki, nodelay
        self.name = "Orthanc SyncStorageArea" + (" +NODELAY" if nodelay else "")
        self.preload = [shims["nodelay"]] if nodelay else []
        self.orthanc: Orthanc | None = None

    def start(self, d: Path) -> None:
        self.port = free_port()
        o = Orthanc(dir=d, pki=self.pki)
        o._write_configs()
        cfg_path = d / "orthanc.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update({"DicomServerEnabled": True, "DicomPort": self.port, "DicomAet": self.ae_title,
                    "DicomCheckCalledAet": False, "SyncStorageArea": True, "DicomAlwaysAllowStore": True})
        cfg_path.write_text(json.dumps(cfg, indent=2))
        saved = os.environ.get("LD_PRELOAD")
        os.environ.update(_preload(self.preload))
        try:
            o.start_orthanc()
        finally:
            if saved is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = saved
        self.orthanc = o
        self.proc = o.orthanc_proc
        self._wait_echo()

    def stop(self) -> None:
        if self.orthanc is not None:
            self.orthanc.stop_orthanc()
        self.orthanc, self.proc = None, None


class Passerelled(Receiver):
    """passerelled with its shipped settings. Without `gateway_factory`, the upstream is a stalled PACS (pure
    ingest): a listening socket that never accepts, so the uplink's first request hangs in the TLS handshake
    and nothing leaves. (A closed port would make the uplink claim, fail and reschedule every new instance,
    database work that a real deployment with a working PACS does not have either.)"""

    name = "passerelled"

    def __init__(self, pki: Pki, gateway_factory=None, **kw) -> None:
        super().__init__()
        self.pki, self.factory, self.kw = pki, gateway_factory, kw
        self.gateway: Gateway | None = None

    @property
    def ae_title(self) -> str:  # type: ignore[override]
        return self.gateway.ae_title if self.gateway else "PASSERELLE"

    def start(self, d: Path) -> None:
        if self.factory is not None:
            g = self.factory(d)
        else:
            self.stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.stalled.bind(("127.0.0.1", 0))
            self.stalled.listen(64)
            port = self.stalled.getsockname()[1]
            g = Gateway(dir=d, stow_url=f"https://localhost:{port}/dicom-web/studies", ca_file=self.pki.ca_cert,
                        **self.kw)
            g.write_config()
        g.start(wait_ready=True)
        self.gateway, self.proc, self.port = g, g.proc, g.port

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop_ok()
        self.gateway, self.proc = None, None
        if getattr(self, "stalled", None) is not None:
            self.stalled.close()
            self.stalled = None


def wipe(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
