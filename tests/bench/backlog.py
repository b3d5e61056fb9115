"""The start-up scenario's backlog: 100,000 tiny CT instances queued in a passerelled spool whose upstream is
unreachable. Made once through the daemon itself (4 storescu associations), then cached under
tests/.work/bench-data/ and copied for each measured start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from harness.data import Instance


def tiny_instances(out: Path, count: int, parts: int = 4) -> list[Path]:
    """`count` tiny CT files (16x16 pixels) in `parts` sub-directories; each has its own SOP Instance UID,
    written by replacing a same-length placeholder in one template (fast). Returns the directories."""
    dirs = [out / f"part{k}" for k in range(parts)]
    marker = out / f"done-{count}"
    if marker.exists():
        return dirs
    base = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")  # pydicom's root, fixed width below
    placeholder = (base + "." + "9" * 12)[:60]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = placeholder
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = placeholder
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Backlog"
    ds.PatientID = "BENCH-BACKLOG"
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    template = out / "template.dcm"
    out.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(template, ds, enforce_file_format=True)
    raw = template.read_bytes()
    head = placeholder[: len(placeholder) - 12]
    for d in dirs:
        d.mkdir(exist_ok=True)
    for n in range(count):
        uid = f"{head}{n + 100000000000:012d}"
        assert len(uid) == len(placeholder)
        (dirs[n % parts] / f"T{n:06d}.dcm").write_bytes(raw.replace(placeholder.encode(), uid.encode()))
    marker.write_text("ok")
    return dirs


def instances_of(dirs: list[Path]) -> list[Instance]:
    """Minimal Instance records (for the storescu profile: one SOP class, one transfer syntax)."""
    p = next(dirs[0].iterdir())
    return [Instance(path=p, name=p.name, sop_class_uid=CTImageStorage, sop_instance_uid="", study_instance_uid="",
                     transfer_syntax_uid=ExplicitVRLittleEndian)]


def build_spool(cache: Path, count: int, pki, sender_env: dict[str, str], log=print) -> Path:  # type: ignore[no-untyped-def]
    """A spool holding `count` queued tiny instances (upstream unreachable), made once through passerelled
    and cached at `cache`/spool. Returns that spool directory."""
    import os
    import shutil
    import subprocess
    import time

    from harness.send import STORESCU, write_storescu_profile

    from .receivers import Passerelled

    spool = cache / "spool"
    marker = cache / f"spool-done-{count}"
    if marker.exists() and spool.is_dir():
        return spool
    shutil.rmtree(cache / "gw", ignore_errors=True)
    dirs = tiny_instances(cache / "files", count)
    log(f"Filling a spool with {count} queued instances through passerelled (once; cached) ...")
    rx = Passerelled(pki)
    rx.start(cache / "gw")
    try:
        cfg, prof = write_storescu_profile(instances_of(dirs), cache / "storescu.cfg")
        t0 = time.monotonic()
        procs = [subprocess.Popen([STORESCU, "-aet", "BACKLOG", "-aec", rx.ae_title, "-xf", str(cfg), prof, "+sd",
                                   "127.0.0.1", str(rx.port), str(d)], env={**os.environ, **sender_env},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for d in dirs]
        codes = [p.wait() for p in procs]
        st = rx.gateway.status()  # type: ignore[union-attr]
        held = st["queued"] + st["uploading"]
        log(f"Backlog: {held} instances held after {time.monotonic() - t0:.0f} s (storescu exit codes {codes})")
        if held < count:
            raise AssertionError(f"only {held} of {count} instances queued for the start-up scenario")
    finally:
        rx.stop()
    shutil.rmtree(spool, ignore_errors=True)
    (cache / "gw" / "spool").rename(spool)
    shutil.rmtree(cache / "gw", ignore_errors=True)
    marker.write_text("ok")
    return spool
