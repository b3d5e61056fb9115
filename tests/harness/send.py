"""Sending DICOM like a modality: dcmtk `storescu` and pynetdicom, plus a dcmtk `storescp +B` reference
receiver that records exactly what went over the wire.

`storescu` re-encodes the files it reads (it parses and writes them again), and it cannot send a
compressed file without a presentation context for that file's own transfer syntax. We therefore give
it an association profile (`-xf cfg profile`) with one context per (SOP Class, transfer syntax) pair of
the files to send, so every file goes out in its own transfer syntax, and for the byte-identity check we
compare against what a bit-preserving `storescp` received from the very same command.

pynetdicom's `send_c_store(path)`, with `_config.STORE_SEND_CHUNKED_DATASET` on, sends the dataset of a
Part-10 file as it is encoded in the file, without decoding it, so for pynetdicom the reference is the
file itself. (Its command then takes the UIDs from the file meta, so only files whose meta and dataset
UIDs agree are sent that way.)
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from .data import Instance
from .part10 import file_dataset_bytes
from .util import free_port, run, start_process, stop_process_group, tail, wait_until

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"

DEFAULT_CALLING_AE = "MODALITY1"


# -- dcmtk association profile ----------------------------------------------------------------------------


def write_storescu_profile(instances: list[Instance], path: Path, profile: str = "Passthrough") -> tuple[Path, str]:
    """Writes a dcmtk association config proposing, for every (SOP Class, transfer syntax) pair of
    `instances`, a context with exactly that transfer syntax. Returns (config path, profile name)."""
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances})
    syntaxes = sorted({ts for _, ts in pairs})
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts needed; DICOM allows at most 128 per association")
    ts_name = {ts: f"TS{n}" for n, ts in enumerate(syntaxes, 1)}
    lines = ["[[TransferSyntaxes]]"]
    for ts in syntaxes:
        lines += [f"[{ts_name[ts]}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    for n, (sop_class, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop_class}\\{ts_name[ts]}")
    lines += ["", "[[Profiles]]", f"[{profile}]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines))
    return path, profile


# -- storescu ---------------------------------------------------------------------------------------------


@dataclass
class StoreResult:
    ok: int
    failed: int
    output: str
    returncode: int


_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu(
    port: int,
    instances: list[Instance],
    workdir: Path,
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    host: str = "127.0.0.1",
    check: bool = True,
    timeout: float = 600,
) -> StoreResult:
    """Sends `instances` over one association with dcmtk storescu, each in its own transfer syntax.

    With `check`, every C-STORE must get a Success response (and storescu must exit 0).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, profile = write_storescu_profile(instances, workdir / "storescu.cfg")
    argv = [
        STORESCU, "-v", "-aet", calling_ae, "-aec", called_ae, "-xf", str(cfg), profile,
        "--no-halt", host, str(port), *[str(i.path) for i in instances],
    ]  # fmt: skip
    cp = run(argv, timeout=timeout, check=False)
    output = cp.stdout + cp.stderr
    statuses = _RESPONSE.findall(output)
    ok = sum(1 for s in statuses if s.startswith("Success"))
    result = StoreResult(ok=ok, failed=len(instances) - ok, output=output, returncode=cp.returncode)
    if check and (cp.returncode != 0 or ok != len(instances)):
        raise AssertionError(
            f"storescu stored {ok} of {len(instances)} instances (exit code {cp.returncode}).\n"
            f"--- storescu output (tail) ---\n{output[-5000:]}"
        )
    return result


def echoscu(port: int, called_ae: str, calling_ae: str = DEFAULT_CALLING_AE, host: str = "127.0.0.1",
            timeout: float = 30) -> subprocess.CompletedProcess:
    """One C-ECHO with dcmtk echoscu (not checked: the caller looks at the return code)."""
    return run([ECHOSCU, "-aet", calling_ae, "-aec", called_ae, "-to", "10", "-ta", "10", "-td", "10",
                host, str(port)], timeout=timeout, check=False)  # fmt: skip


# -- pynetdicom -------------------------------------------------------------------------------------------


def pynetdicom_sendable(inst: Instance) -> bool:
    """Whether pynetdicom can send `inst` straight from its file: the command UIDs come from the file
    meta, so they must match the dataset's, and a PDV must have an even length."""
    ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
    return (
        str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")) == inst.sop_instance_uid
        and str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == inst.sop_class_uid
        and len(file_dataset_bytes(inst.path)) % 2 == 0
    )


def pynetdicom_send(
    port: int,
    instances: list[Instance],
    called_ae: str,
    calling_ae: str = DEFAULT_CALLING_AE,
    host: str = "127.0.0.1",
    check: bool = True,
) -> list[int]:
    """Sends `instances` with pynetdicom from their file paths (no re-encoding); returns the statuses
    (-1 when no response came).

    Raises if the association is not accepted, or (with `check`) if a C-STORE does not succeed.
    """
    from pynetdicom import AE, _config

    # Send each dataset straight from its file, as encoded there (by default pynetdicom decodes the file
    # and encodes it again). The command's UIDs then come from the file meta.
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in instances}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise AssertionError(f"pynetdicom: association to {called_ae}@{host}:{port} was not established")
    statuses: list[int] = []
    try:
        for inst in instances:
            status = assoc.send_c_store(inst.path)
            code = int(status.Status) if status and "Status" in status else -1
            statuses.append(code)
            if check and code != 0x0000:
                raise AssertionError(f"pynetdicom: C-STORE of {inst.name} returned status 0x{code:04X}")
    finally:
        assoc.release()
    return statuses


# -- the bit-preserving reference receiver ----------------------------------------------------------------


@dataclass
class ReferenceReceiver:
    """dcmtk `storescp +B`: writes each received dataset exactly as it came over the wire."""

    dir: Path
    ae_title: str = "REFERENCE"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> "ReferenceReceiver":
        (self.dir / "in").mkdir(parents=True, exist_ok=True)
        self.proc = start_process(
            [STORESCP, "-aet", self.ae_title, "+xa", "+B", "-od", str(self.dir / "in"), str(self.port)],
            self.dir / "storescp.log",
        )
        wait_until(
            lambda: echoscu(self.port, self.ae_title).returncode == 0,
            30,
            f"the reference storescp on port {self.port}",
        )
        return self

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.proc = None

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> dataset bytes after group 0002, for every file received so far."""
        out: dict[str, bytes] = {}
        for p in (self.dir / "in").iterdir():
            ds = pydicom.dcmread(p, stop_before_pixels=True, force=True)
            out[str(ds.file_meta.MediaStorageSOPInstanceUID)] = file_dataset_bytes(p)
        return out

    def log_tail(self) -> str:
        return tail(self.dir / "storescp.log")


def wire_reference_storescu(instances: list[Instance], workdir: Path) -> dict[str, bytes]:
    """What `storescu(...)` actually puts on the wire for `instances`: SOP Instance UID -> dataset bytes."""
    rx = ReferenceReceiver(workdir / "reference").start()
    try:
        storescu(rx.port, instances, workdir / "reference-send", called_ae=rx.ae_title)
        got = rx.received()
    finally:
        rx.stop()
    missing = {i.sop_instance_uid for i in instances} - got.keys()
    assert not missing, f"The reference storescp did not receive {sorted(missing)}\n{rx.log_tail()}"
    return got


def file_reference(instances: list[Instance]) -> dict[str, bytes]:
    """The dataset bytes as encoded in the files (what pynetdicom sends from a path)."""
    return {i.sop_instance_uid: file_dataset_bytes(i.path) for i in instances}
