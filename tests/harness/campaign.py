"""The crash-consistency campaign's tools: modalities that keep storing through daemon crashes and
record exactly what was acknowledged, the crash points, what Orthanc received (with re-deliveries),
and the figures file.

The crash points are compiled into a separate build of passerelled (`cargo build --release -p passerelled
--features failpoints --target-dir target/failpoints`) and armed through the `FAILPOINTS` environment
variable of the `fail` crate; the daemon kills itself with SIGKILL when one fires and logs
`Crash point <name> reached` just before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .data import Instance, generate_ct_study
from .gateway import REPO
from .orthanc import Orthanc

# Where each crash point sits (the names the crates give to `crash_point!`).
CRASH_POINTS = {
    "ingest::receive::mid_dataset": "mid-PDV: part of an instance's data is in the spool's temporary file",
    "spool::commit::before_row": "after file fsync, rename and directory fsync, before the SQLite row commit",
    "ingest::store::before_response": "after the row commit, before the C-STORE response",
    "spool::compact::before_row": "after a compacted file replaced an intake file (fsynced, renamed, directory fsynced), before its row records it",
    "uplink::body::mid_upload": "mid-upload: part of the STOW-RS request body has been sent",
    "uplink::record::before_mark_sent": "after the PACS's parsed confirmation, before the row is marked sent",
}

_CRASH_LINE = re.compile(r"Crash point (\S+) reached")

# Orthanc calls ReceivedInstanceFilter for every instance it receives, before it checks whether it
# already holds it: one line per delivery, so re-deliveries can be counted upstream.
RECEIVED_LOG_LUA = """\
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open({path}, "a")
  if f ~= nil then
    f:write(tostring(dicom.SOPInstanceUID) .. "\\n")
    f:close()
  end
  return true
end
"""


def failpoints_bin() -> Path:
    """`$PASSERELLED_FAILPOINTS` if set, else the failpoints build in this repository."""
    default = REPO / "target" / "failpoints" / "release" / "passerelled"
    return Path(os.environ.get("PASSERELLED_FAILPOINTS", default))


def write_received_log_script(d: Path) -> tuple[Path, Path]:
    """(the Lua script for Orthanc, the file it appends each received SOP Instance UID to)."""
    d.mkdir(parents=True, exist_ok=True)
    log = d / "orthanc-received.txt"
    script = d / "received-log.lua"
    script.write_text(RECEIVED_LOG_LUA.replace("{path}", json.dumps(str(log))))
    return script, log


def received_counts(log: Path) -> Counter:
    """SOP Instance UID -> how many times Orthanc received it."""
    if not log.exists():
        return Counter()
    return Counter(line.strip() for line in log.read_text().splitlines() if line.strip())


def crash_points_hit(log_text: str) -> Counter:
    return Counter(_CRASH_LINE.findall(log_text))


def orthanc_uids(orthanc: Orthanc) -> set[str]:
    """Every SOP Instance UID Orthanc holds, in one request."""
    rows = orthanc.get("/instances", params={"expand": ""}).json()
    return {r["MainDicomTags"]["SOPInstanceUID"] for r in rows}


def small_studies(out_dir: Path, studies: int, per_study: int, size: int = 64) -> list[Instance]:
    """`studies` generated CT studies of `per_study` `size`x`size` slices (about 8 KiB each at 64)."""
    out: list[Instance] = []
    for k in range(studies):
        out += generate_ct_study(
            out_dir / f"study{k:02d}",
            slices=per_study,
            size=size,
            seed=5000 + k,
            patient_id=f"PASS-CRASH-{k:03d}",
        ).instances
    return out


@dataclass(eq=False)  # threads must stay hashable
class Modality(threading.Thread):
    """A modality that stores its instances over and over new associations until each one has been
    acknowledged (0x0000) or it is told to stop; the daemon may die under it at any moment.

    `acked` holds exactly the SOP Instance UIDs that got a success response.
    """

    port: int
    called_ae: str
    calling_ae: str
    instances: list[Instance]
    per_association: int = 4
    pace_secs: float = 0.0
    acked: set[str] = field(default_factory=set)
    attempts: int = 0
    failures: Counter = field(default_factory=Counter)
    stop_event: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name=f"modality-{self.calling_ae}", daemon=True)

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the test through `error`
            self.error = e

    def _run(self) -> None:
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes as they are, never re-encoded
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = 10
        ae.dimse_timeout = 20
        ae.network_timeout = 20
        ae.connection_timeout = 2
        for sop_class, ts in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in self.instances}):
            ae.add_requested_context(sop_class, ts)
        pending = list(self.instances)
        while pending and not self.stop_event.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
            if not assoc.is_established:
                self.failures["association"] += 1
                self.stop_event.wait(0.05)  # the daemon is restarting: try again shortly
                continue
            try:
                for inst in pending[: self.per_association]:
                    if self.stop_event.is_set() or not assoc.is_established:
                        break
                    self.attempts += 1
                    status = assoc.send_c_store(inst.path)
                    code = int(status.Status) if status and "Status" in status else -1
                    if code == 0x0000:
                        self.acked.add(inst.sop_instance_uid)
                    else:
                        self.failures[f"0x{code & 0xFFFF:04X}" if code >= 0 else "no response"] += 1
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
            pending = [i for i in pending if i.sop_instance_uid not in self.acked]
            if self.pace_secs:
                self.stop_event.wait(self.pace_secs)

    @property
    def done(self) -> bool:
        return len(self.acked) == len(self.instances)


def write_figures(name: str, figures: dict) -> Path:
    """Writes `tests/.work/figures/<name>.json` (a flat JSON object) for the RELIABILITY.md generator."""
    d = REPO / "tests" / ".work" / "figures"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return path
