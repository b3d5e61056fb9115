"""Local faults: a full disk, corrupted spool files, a lost, damaged or replaced spool database, and a 2 GB instance.

Each case runs the real daemon against Orthanc, except the 2 GB one, which forwards to a streaming STOW-RS sink
(`harness/stow_sink.py`): Orthanc ingests 2 GB in 8-13 minutes, and `test_large.py` proves its path. Nothing
acknowledged may be lost: every instance that got a success status arrives upstream (or, if its spool file was
damaged on disk, is quarantined and reported, never sent). The figures (cases passed, what was evicted, quarantined and rebuilt, peak RSS) go to
`tests/.work/figures/local.json` for `tests/reliability_report.py`.

The disk-full case needs root (it mounts a small tmpfs for the spool), as CI runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Instance, Study, ct_slice_hu
from harness.gateway import Gateway, toml_str
from harness.part10 import meta_end_offset
from harness.stow_sink import StowSink
from harness.util import run, wait_until

MIB = 2**20
FIGURES = Path(__file__).resolve().parents[1] / ".work" / "figures" / "local.json"
_results: dict[str, str] = {}
_figures: dict[str, object] = {}

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700


def _write_figures() -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    lost = sum(v for k, v in _figures.items() if k.endswith("_lost") and isinstance(v, int))
    figures = {
        "local_cases_run": len(_results),
        "local_cases_passed": sum(1 for r in _results.values() if r == "passed"),
        **{f"local_case_{k}": v for k, v in sorted(_results.items())},
        **_figures,
        "lost": lost,
    }
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@pytest.fixture(autouse=True)
def figure(request: pytest.FixtureRequest):
    """Records each case's result into the figures file (a case that fails is recorded as failed)."""
    name = request.node.name.removeprefix("test_")
    _results[name] = "failed"
    _write_figures()
    failed_before = request.session.testsfailed
    yield
    _results[name] = "failed" if request.session.testsfailed > failed_before else "passed"
    _write_figures()


# -- helpers -----------------------------------------------------------------------------------------


def configure_spool(gw: Gateway, spool_dir: Path | None = None, **keys: object) -> Path:
    """Rewrites the gateway's `[spool]` section: another directory and/or other keys."""
    text = gw.config_path.read_text()
    spool_dir = spool_dir or gw.spool_dir
    text = text.replace(f"dir = {toml_str(gw.spool_dir)}", f"dir = {toml_str(spool_dir)}")
    lines = "\n".join(f"{k} = {v}" for k, v in {"min_free_mb": 64, **keys}.items())
    assert "min_free_mb = 64" in text, text
    gw.config_path.write_text(text.replace("min_free_mb = 64", lines))
    return spool_dir


def store(gw: Gateway, instances: list[Instance]) -> list[int]:
    """pynetdicom C-STOREs (sent straight from the files); returns each status."""
    return send.pynetdicom_send(gw.port, instances, called_ae=gw.ae_title, check=False)


def spool_files(spool_dir: Path) -> dict[str, str]:
    """Spool file name -> SHA-256 of its content (decompressed: the compactor rewrites files in place,
    same content), for every file under objects/ that holds an instance (empty ones are the spool's
    files created ahead)."""
    return {
        p.name: hashlib.sha256(
            subprocess.run(["zstd", "-d", "-c", str(p)], capture_output=True, check=True).stdout
        ).hexdigest()
        for p in (spool_dir / "objects").glob("*/*.dcm.zst")
        if p.stat().st_size > 0
    }


def rows(spool_dir: Path) -> dict[str, str]:
    """SOP Instance UID -> spool file path, read (read-only) from the database of a stopped daemon."""
    con = sqlite3.connect(f"file:{spool_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        return {uid: path for uid, path in con.execute("SELECT sop_instance_uid, path FROM instances")}
    finally:
        con.close()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_up(filler: Path) -> None:
    """Grows `filler` until its file system has not one free block (the daemon may write meanwhile)."""
    for _ in range(20):
        free = free_bytes(filler.parent)
        if free == 0:
            return
        with open(filler, "ab") as f:
            try:
                os.posix_fallocate(f.fileno(), f.seek(0, os.SEEK_END), free)
            except OSError:
                pass  # someone else took some of it: measure again
    raise AssertionError(f"could not fill {filler.parent}: {free_bytes(filler.parent)} bytes still free")


def error_lines(gw: Gateway) -> list[str]:
    return [line for line in gw.log_path.read_text(errors="replace").splitlines() if " ERROR " in line]


def wait_exit(gw: Gateway, timeout: float = 30) -> int:
    assert gw.proc is not None
    try:
        code = gw.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"passerelled did not exit within {timeout:.0f} s\n{gw.log_excerpt()}") from None
    gw.proc = None
    return code


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 32 MiB tmpfs, unmounted at the end whatever happened (torn down after the daemon: request it first)."""
    if os.geteuid() != 0:
        pytest.fail("The disk-full case mounts a tmpfs and must run as root (as CI does).")
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- disk full ---------------------------------------------------------------------------------------


def noise_instance(path: Path, mib: int) -> Instance:
    """A single-frame 16-bit secondary capture of random pixels (`mib` MiB that zstd cannot shrink)."""
    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage as SC_WORD

    side = 1024
    rows = mib * MIB // (2 * side)
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SC_WORD, uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC_WORD, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "Test^Noise", "PASS-TEST-NOISE", "OT", "WSD"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", 1
    ds.Rows, ds.Columns = rows, side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(5).integers(0, 65535, rows * side, dtype=np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Instance(path=path, name=path.name, sop_class_uid=SC_WORD, sop_instance_uid=uid,
                    study_instance_uid=str(ds.StudyInstanceUID), transfer_syntax_uid=ExplicitVRLittleEndian)  # fmt: skip



def test_disk_full_evicts_confirmed_cache_first_refuses_with_a700_and_recovers_by_itself(
    small_fs: Path, orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    started = time.monotonic()
    a, b = ct_study.instances[:60], ct_study.instances[60:80]
    c1, c2 = ct_study.instances[80], ct_study.instances[81]
    gw = make_gateway(orthanc)
    min_free_mb, headroom_mb = 4, 1
    spool_dir = configure_spool(
        gw, small_fs / "spool", min_free_mb=min_free_mb, evict_headroom_mb=headroom_mb, retention_hours=168
    )
    filler = small_fs / "filler"  # another writer on the spool's file system
    gw.start()

    # A: confirmed upstream, kept as the local cache.
    assert store(gw, a) == [STATUS_SUCCESS] * len(a)
    wait_until(lambda: gw.status()["sent"] == len(a), 120, "the first 60 instances to be confirmed")
    cache_bytes = gw.status()["stored_bytes"]
    assert cache_bytes >= 3 * MIB, f"the cache ({cache_bytes} bytes) is too small for this test"

    # B: acknowledged while the PACS is down, so unconfirmed.
    orthanc.stop_orthanc()
    assert store(gw, b) == [STATUS_SUCCESS] * len(b)
    unconfirmed = spool_files(spool_dir)
    wait_until(lambda: gw.status()["queued"] + gw.status()["uploading"] == len(b), 30, "B to be queued")
    assert len(unconfirmed) == len(a) + len(b)

    # 1. Below min_free_mb, but the cache can make room: the C-STORE succeeds, oldest cache evicted.
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(small_fs) - (min_free_mb * MIB - MIB // 2))
    assert free_bytes(small_fs) < min_free_mb * MIB
    assert store(gw, [c1]) == [STATUS_SUCCESS]
    s = gw.status()
    evicted_first = s["evicted"]
    assert 0 < evicted_first < len(a), s
    assert s["queued"] + s["uploading"] == len(b) + 1 and s["lost"] == 0, s
    assert free_bytes(small_fs) >= min_free_mb * MIB

    # 2. The disk is full (ENOSPC): the rest of the cache goes, then the C-STORE gets 0xA700.
    fill_up(filler)
    assert store(gw, [c2]) == [STATUS_OUT_OF_RESOURCES]
    s = gw.status()
    assert s["evicted"] == len(a), f"the whole confirmed cache should have been evicted first: {s}"
    assert s["queued"] + s["uploading"] == len(b) + 1 and s["lost"] == 0 and s["failed"] == 0, s
    # Nothing unconfirmed was touched: every file of B is still there, byte for byte.
    now = spool_files(spool_dir)
    b_files = {k: v for k, v in unconfirmed.items() if k in now}
    assert len(b_files) == len(b) and all(now[k] == v for k, v in b_files.items()), "an unconfirmed file changed"
    assert not _ingest_temp_files(spool_dir), "the refused instance left a temporary file"
    full_log = [ln for ln in gw.log_path.read_text(errors="replace").splitlines() if c2.sop_instance_uid in ln]
    assert any("free" in ln.lower() for ln in full_log), f"no log line says why {c2.sop_instance_uid} was refused"

    # 3. Nothing left to evict and not one free block, while the uplink keeps retrying (and writing its
    #    retries to the database): still 0xA700, no crash, and nothing lost.
    fill_up(filler)
    log_lines = len(gw.log_path.read_text(errors="replace").splitlines())
    assert store(gw, [c2]) == [STATUS_OUT_OF_RESOURCES]
    wait_until(
        lambda: sum(" passerelle_uplink" in ln for ln in gw.log_path.read_text(errors="replace").splitlines()[log_lines:])
        >= 3,
        30,
        "the uplink to go through a few retries on the full disk",
    )
    assert gw.running, f"passerelled died on the full disk\n{gw.log_excerpt()}"

    # 4. Space returns: the same C-STORE succeeds, without a restart.
    filler.unlink()
    assert store(gw, [c2]) == [STATUS_SUCCESS]

    # 5. The disk fills up during a reception: above min_free_mb when it starts, but the instance (random
    #    pixels, which do not compress) does not fit: 0xA700, the partial file is removed, and the next
    #    C-STORE succeeds.
    noise = noise_instance(tmp_path / "noise.dcm", mib=8)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free_bytes(small_fs) - (min_free_mb + 2) * MIB)
    assert store(gw, [noise]) == [STATUS_OUT_OF_RESOURCES]
    assert not _ingest_temp_files(spool_dir), "the partial file of the refused instance was left behind"
    assert free_bytes(small_fs) >= min_free_mb * MIB
    filler.unlink()
    assert store(gw, [noise]) == [STATUS_SUCCESS]

    # Everything acknowledged arrives once the PACS is back, byte for byte.
    orthanc.start_orthanc()
    everything = a + b + [c1, c2, noise]
    wait_for_instances(orthanc, len(everything), timeout=120, what="everything after the disk was full")
    s = wait_until(lambda: (s := gw.status())["sent"] == len(everything) and s, 60, "all to be confirmed")
    assert s["lost"] == 0 and s["failed"] == 0 and s["quarantined"] == 0, s
    assert_byte_identical(orthanc, send.file_reference(everything))
    # The compactor's copies (tmp/*.compact, which it may be writing whenever there is room) never
    # stay behind either: once it has caught up, tmp/ is empty.
    wait_until(lambda: not list((spool_dir / "tmp").iterdir()), 120, "the compactor to leave tmp/ empty")
    gw.stop_ok()
    _figures.update(
        disk_full_acknowledged=len(everything),
        disk_full_lost=len(everything) - len(set(orthanc.sop_instance_uids()) & {i.sop_instance_uid for i in everything}),
        disk_full_evicted_to_make_room=evicted_first,
        disk_full_evicted_total=s["evicted"],
        disk_full_refused_a700=3,
        disk_full_seconds=round(time.monotonic() - started, 1),
    )


def _ingest_temp_files(spool_dir: Path) -> list[Path]:
    """Ingest's temporary files (`tmp/*.part`). The compactor's copies (`tmp/*.compact`) may exist at any
    moment while it works, and are checked at the end of the test."""
    return [p for p in (spool_dir / "tmp").iterdir() if p.suffix == ".part"]


# -- corrupted spool files ---------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _same_length_other_content(path: Path) -> None:
    """A valid zstd stream (checksum included) of other bytes: only the SHA-256 can tell."""
    raw = bytearray(subprocess.run(["zstd", "-d", "-c", str(path)], capture_output=True, check=True).stdout)
    raw[len(raw) // 2] ^= 0x01
    out = subprocess.run(["zstd", "-1", "--check", "-c"], input=bytes(raw), capture_output=True, check=True).stdout
    path.write_bytes(out)


def test_corrupted_spool_files_are_quarantined_reported_and_never_sent(
    orthanc, make_gateway, ct_study: Study
) -> None:
    started = time.monotonic()
    instances = ct_study.instances[100:110]
    gw = make_gateway(orthanc)
    gw.start()
    orthanc.stop_orthanc()
    assert store(gw, instances) == [STATUS_SUCCESS] * len(instances)
    gw.stop_ok()

    # The disk damages three queued files: bytes flipped, truncated, and other content in a valid stream.
    paths = rows(gw.spool_dir)
    damaged = {inst.sop_instance_uid: how for inst, how in zip(instances[:3], (_flip, _truncate, _same_length_other_content))}
    for uid, how in damaged.items():
        how(gw.spool_dir / paths[uid])

    gw.start()
    orthanc.start_orthanc()
    intact = instances[3:]
    wait_for_instances(orthanc, len(intact), timeout=120, what="the intact instances")
    s = wait_until(
        lambda: (s := gw.status())["sent"] == len(intact) and s["quarantined"] == len(damaged) and s,
        60,
        "the intact instances confirmed and the damaged ones quarantined",
    )
    assert s["queued"] == 0 and s["lost"] == 0 and s["failed"] == 0, s
    held = orthanc.sop_instance_uids()
    assert not damaged.keys() & held.keys(), "a corrupt spool file was sent"
    assert_byte_identical(orthanc, send.file_reference(intact))
    errors = error_lines(gw)
    for uid in damaged:
        assert any(uid in ln and "quarantine" in ln for ln in errors), f"no ERROR line names {uid}:\n{errors}"
    assert len(list((gw.spool_dir / "quarantine").iterdir())) == len(damaged)
    assert "quarantined: 3" in gw.status_text()
    gw.stop_ok()
    _figures.update(
        corruption_damaged_files=len(damaged),
        corruption_quarantined=s["quarantined"],
        corruption_sent_corrupt=len(damaged.keys() & held.keys()),
        corruption_lost=len({i.sop_instance_uid for i in intact} - held.keys()),
        corruption_seconds=round(time.monotonic() - started, 1),
    )


# -- a missing, damaged or replaced spool database ---------------------------------------------------


def _delete_database(spool_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (spool_dir / f"spool.db{suffix}").unlink(missing_ok=True)


def _garbage_database(spool_dir: Path) -> None:
    _delete_database(spool_dir)
    (spool_dir / "spool.db").write_bytes(os.urandom(256 * 1024))


def _empty_database(spool_dir: Path) -> None:
    """spool.db replaced by another valid database with an empty queue (a blank image, a wrong restore): only
    the spool's id (spool.db's `meta` table against the file spool.id) tells it from the real one."""
    _delete_database(spool_dir)
    db = sqlite3.connect(spool_dir / "spool.db")
    db.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY)")
    db.commit()
    db.close()
    assert (spool_dir / "spool.id").is_file(), "the daemon gave the spool an id"


@pytest.mark.parametrize(
    "damage", [_delete_database, _garbage_database, _empty_database], ids=["deleted", "garbage", "replaced_by_empty"]
)
def test_lost_spool_database_refuses_to_start_and_rebuild_index_delivers_everything(
    orthanc, make_gateway, ct_study: Study, damage
) -> None:
    started = time.monotonic()
    confirmed, queued = ct_study.instances[120:125], ct_study.instances[125:135]
    gw = make_gateway(orthanc)
    gw.start()
    assert store(gw, confirmed) == [STATUS_SUCCESS] * len(confirmed)
    wait_until(lambda: gw.status()["sent"] == len(confirmed), 60, "the first instances to be confirmed")
    orthanc.stop_orthanc()
    assert store(gw, queued) == [STATUS_SUCCESS] * len(queued)

    # The rebuild is refused while the daemon holds the spool.
    cp = gw.cli("rebuild-index", "--config", str(gw.config_path))
    assert cp.returncode != 0 and "stop passerelled" in (cp.stdout + cp.stderr), cp
    gw.stop_ok()

    damage(gw.spool_dir)
    # The daemon does not start with an empty queue while spool files exist: it says what to do.
    gw.start(wait_ready=False)
    assert wait_exit(gw) != 0
    errors = error_lines(gw)
    assert any("rebuild-index" in ln for ln in errors), f"no ERROR line says to run rebuild-index:\n{errors}"
    if damage is _empty_database:
        assert any("does not belong to this spool" in ln for ln in errors), errors
    cp = gw.cli("status", "--config", str(gw.config_path))
    assert cp.returncode != 0 and "rebuild-index" in cp.stdout + cp.stderr, cp

    cp = gw.cli("rebuild-index", "--config", str(gw.config_path))
    assert cp.returncode == 0, cp
    total = len(confirmed) + len(queued)
    assert f"queued={total}" in cp.stdout and "quarantined=0" in cp.stdout, cp.stdout

    gw.start()
    orthanc.start_orthanc()
    wait_for_instances(orthanc, total, timeout=120, what="everything after the rebuild")
    s = wait_until(lambda: (s := gw.status())["sent"] == total and s, 60, f"{total} confirmed after the rebuild")
    assert s["lost"] == 0 and s["failed"] == 0 and s["queued"] == 0, s
    # At-least-once: every rebuilt row may have been delivered before, and is counted as such.
    assert s["duplicates_upstream"] == total, s
    assert_byte_identical(orthanc, send.file_reference(confirmed + queued))
    gw.stop_ok()
    name = damage.__name__.strip("_")
    _figures.update(
        {
            f"rebuild_{name}_rows_rebuilt": total,
            f"rebuild_{name}_resent_confirmed": len(confirmed),
            f"rebuild_{name}_lost": total - len(orthanc.sop_instance_uids()),
            f"rebuild_{name}_seconds": round(time.monotonic() - started, 1),
        }
    )


# -- a 2 GB instance ---------------------------------------------------------------------------------

HUGE_FRAMES, HUGE_SIZE = 1000, 1024  # 1000 frames of 1024x1024 at 16 bits: 2,097,152,000 bytes of pixels
# Every sixteenth frame is an image, the others blank (zeros, a hole in the sparse file): 126 MiB of images, so
# that the test fits on a small CI disk, while a daemon that held even the compressed instance in memory would
# still pass 64 MiB. The spool stores a blank frame's bytes as RLE blocks (spool `rawframe`).
HUGE_IMAGE_EVERY = 16
RSS_LIMIT_MIB = 64


def write_huge_instance(path: Path) -> Instance:
    """Multi-frame secondary capture written streaming: pydicom writes everything before the pixel data,
    then the Pixel Data element (explicit length) is appended frame by frame, blank frames as holes."""
    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage as SC_WORD

    rng = np.random.default_rng(2026)
    frames = [np.clip(np.round(ct_slice_hu(k / 5, HUGE_SIZE, rng) + 1024), 0, 4095).astype(np.uint16).tobytes()
              for k in range(6)]  # fmt: skip
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_WORD
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC_WORD, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.ConversionType = "Test^Huge", "PASS-TEST-HUGE", "OT", "WSD"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = HUGE_FRAMES, HUGE_SIZE, HUGE_SIZE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    length = HUGE_FRAMES * len(frames[0])
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for k in range(HUGE_FRAMES):
            if k % HUGE_IMAGE_EVERY == 0:
                f.write(frames[(k // HUGE_IMAGE_EVERY) % len(frames)])
            else:
                f.seek(len(frames[0]), os.SEEK_CUR)  # a blank frame: a hole, read back as zeros
        f.truncate()
    return Instance(path=path, name=path.name, sop_class_uid=SC_WORD, sop_instance_uid=uid,
                    study_instance_uid=str(ds.StudyInstanceUID), transfer_syntax_uid=ExplicitVRLittleEndian)  # fmt: skip


def _sha256_after_meta(chunks) -> str:
    """SHA-256 of the dataset bytes after group 0002, over a stream of chunks."""
    h, head, skip = hashlib.sha256(), b"", None
    for chunk in chunks:
        if skip is None:
            head += chunk
            if len(head) < 64 * 1024:
                continue
            skip = meta_end_offset(head)
            chunk, head = head[skip:], b""
        h.update(chunk)
    if skip is None:
        h.update(head[meta_end_offset(head):])
    return h.hexdigest()


def _file_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            yield chunk


def _allocated_bytes(root: Path) -> int:
    """Disk space the files under `root` take (allocated blocks, not apparent sizes)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_2gb_instance_is_forwarded_with_peak_rss_under_64_mib(make_gateway, pki, tmp_path: Path) -> None:
    """A >2 GB multi-frame instance goes from a C-STORE through the spool to a STOW-RS endpoint, its dataset
    byte-identical, while passerelled's peak RSS (VmHWM) stays under 64 MiB.

    The endpoint is `harness.stow_sink`, a streaming HTTPS sink (mutual TLS with the test PKI) that hashes each
    part's dataset and confirms it per SOP Instance UID: Orthanc takes 8-13 minutes to ingest 2 GB, and the
    Orthanc path is already proven byte-exact by `test_large.py`."""
    images = -(-HUGE_FRAMES // HUGE_IMAGE_EVERY) * HUGE_SIZE * HUGE_SIZE * 2
    need = 3 * images + 256 * MIB  # the file, the intake file, the compactor's copy, and room to spare
    free = shutil.disk_usage(tmp_path).free
    assert free >= need, f"this test needs {need / MIB:.0f} MiB free under {tmp_path}, {free / MIB:.0f} MiB are"
    started = time.monotonic()
    huge = write_huge_instance(tmp_path / "huge.dcm")
    size = huge.path.stat().st_size
    assert size > 2_000_000_000
    want = _sha256_after_meta(_file_chunks(huge.path))
    generated = time.monotonic()
    sink = StowSink(pki).start()
    try:
        gw = make_gateway(sink, extra_uplink={"batch_max_mb": 4096})
        gw.start()
        assert gw.proc is not None
        pid = gw.proc.pid

        assert store(gw, [huge]) == [STATUS_SUCCESS]
        stored = time.monotonic()
        spool_used = _allocated_bytes(gw.spool_dir)
        wait_until(lambda: gw.status()["sent"] == 1, 600, "the 2 GB instance to be confirmed by the STOW-RS sink")
        delivered = time.monotonic()
        peak = _peak_rss_mib(pid)
        gw.stop_ok()
    finally:
        sink.stop()
    assert sink.errors == [], f"the STOW-RS sink refused a request: {sink.errors}"
    assert [p.sop_instance_uid for p in sink.parts] == [huge.sop_instance_uid], sink.parts
    (part,) = sink.parts
    assert part.dataset_sha256 == want, "the 2 GB instance's dataset differs from what was sent"
    # pytest keeps the last runs' directories: do not leave 4 GB behind each time.
    huge.path.unlink()
    shutil.rmtree(gw.spool_dir)
    total = time.monotonic() - started
    _figures.update(
        huge_bytes=size,
        huge_peak_rss_mib=round(peak, 1),
        huge_rss_limit_mib=RSS_LIMIT_MIB,
        huge_generate_seconds=round(generated - started, 1),
        huge_c_store_seconds=round(stored - generated, 1),
        huge_forward_seconds=round(delivered - stored, 1),
        huge_total_seconds=round(total, 1),
        huge_lost=0 if part.dataset_sha256 == want else 1,
        huge_spool_mib=round(spool_used / MIB, 1),
        peak_rss_mib=max(float(_figures.get("peak_rss_mib", 0.0)), round(peak, 1)),
    )
    print(f"2 GB instance: {size} bytes, peak RSS {peak:.1f} MiB, total {total:.0f} s")
    assert peak < RSS_LIMIT_MIB, f"passerelled peaked at {peak:.1f} MiB RSS for a {size / MIB:.0f} MiB instance"
    # The blank frames took no disk: the spool held little more than the images' bytes.
    assert spool_used < images + 64 * MIB, (
        f"the spool used {spool_used / MIB:.0f} MiB of disk for {images / MIB:.0f} MiB of images and blank frames"
    )
