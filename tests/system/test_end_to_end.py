"""1. End to end: modality -> passerelled -> HTTPS STOW-RS -> Orthanc, bit-preserving."""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Instance, Study
from harness.util import wait_until

STATUS_KEYS = {
    "queued", "uploading", "sent", "failed", "lost", "quarantined", "evicted", "duplicates_received",
    "duplicates_upstream", "oldest_queued_age_secs", "last_error", "paused_until",
}  # fmt: skip


def test_every_instance_arrives_byte_identical_and_is_counted_sent(
    orthanc, make_gateway, ct_study: Study, real_split, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    by_storescu, by_pynetdicom = real_split
    gw = make_gateway(orthanc)
    gw.start()

    # The CT study and most real-world files with dcmtk storescu, the others with pynetdicom.
    send.storescu(gw.port, ct_study.instances, tmp_path / "scu-ct", called_ae=gw.ae_title)
    send.storescu(gw.port, by_storescu, tmp_path / "scu-real", called_ae=gw.ae_title, calling_ae="MODALITY2")
    send.pynetdicom_send(gw.port, by_pynetdicom, called_ae=gw.ae_title, calling_ae="PYNETDICOM")

    expected = {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in ct_study.instances + by_storescu}
    expected.update(send.file_reference(by_pynetdicom))
    n = len(expected)
    assert n == len(ct_study.instances) + len(by_storescu) + len(by_pynetdicom)

    wait_for_instances(orthanc, n, timeout=180, what="everything sent to passerelled")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert_byte_identical(orthanc, expected)

    assert STATUS_KEYS <= status.keys(), f"status --json lacks {sorted(STATUS_KEYS - status.keys())}"
    assert status["lost"] == 0, status
    assert status["failed"] == 0, status
    assert status["quarantined"] == 0, status
    assert status["queued"] == 0 and status["uploading"] == 0, status
    assert status["oldest_queued_age_secs"] is None, status
    assert orthanc.count_studies() == len({i.study_instance_uid for i in ct_study.instances + by_storescu + by_pynetdicom})
    gw.stop_ok()


def test_identical_resend_is_acknowledged_and_not_sent_twice(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    few: list[Instance] = ct_study.instances[:10]
    gw = make_gateway(orthanc)
    gw.start()
    send.storescu(gw.port, few, tmp_path / "first", called_ae=gw.ae_title)
    wait_until(lambda: gw.status()["sent"] == len(few), 120, "the first copy to be confirmed")
    send.storescu(gw.port, few, tmp_path / "again", called_ae=gw.ae_title)  # every C-STORE succeeds
    status = wait_until(
        lambda: (s := gw.status())["duplicates_received"] == len(few) and s, 30, "duplicates to be counted"
    )
    assert status["sent"] == len(few) and status["queued"] == 0, status
    assert orthanc.count_instances() == len(few)
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in few})
    gw.stop_ok()


def test_a_corrected_version_is_delivered_and_a_pacs_keeping_its_first_copy_is_pointed_out(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    """The modality sends a corrected instance under the same SOP Instance UID. passerelled keeps both
    versions and delivers the new one; Orthanc (OverwriteInstances off, its default) confirms it but keeps its
    first copy, and STOW-RS answers the same either way. passerelled cannot tell, so it warns, naming the
    instance and what to check."""
    import pydicom

    one = ct_study.instances[0]
    gw = make_gateway(orthanc)
    gw.start()
    send.storescu(gw.port, [one], tmp_path / "first", called_ae=gw.ae_title)
    wait_until(lambda: gw.status()["sent"] == 1, 60, "the first version to be confirmed")
    ds = pydicom.dcmread(one.path)
    ds.SeriesDescription = "CORRECTED"
    corrected = Instance(path=tmp_path / "corrected.dcm", name="corrected.dcm", sop_class_uid=one.sop_class_uid,
                         sop_instance_uid=one.sop_instance_uid, study_instance_uid=one.study_instance_uid,
                         transfer_syntax_uid=one.transfer_syntax_uid)  # fmt: skip
    ds.save_as(corrected.path, enforce_file_format=True)
    send.storescu(gw.port, [corrected], tmp_path / "corrected", called_ae=gw.ae_title)
    status = wait_until(lambda: (s := gw.status())["sent"] == 2 and s, 60, "the corrected version to be confirmed")
    assert status["failed"] == 0 and status["lost"] == 0 and status["duplicates_received"] == 0, status

    warned = wait_until(
        lambda: [l for l in gw.log_path.read_text(errors="replace").splitlines()
                 if "confirmed a new version" in l and one.sop_instance_uid in l],
        30, "the warning about the new version",
    )  # fmt: skip
    assert len(warned) == 1 and "WARN" in warned[0] and "OverwriteInstances" in warned[0], warned
    first_log = gw.log_path.read_text(errors="replace")
    assert first_log.count("confirmed a new version") == 1, "the first version was not a new version"
    with orthanc.session() as s:
        [iid] = orthanc.sop_instance_uids().values()
        tags = s.get(f"{orthanc.base_url}/instances/{iid}/simplified-tags", timeout=30).json()
    assert tags.get("SeriesDescription") != "CORRECTED", "Orthanc took the new version: the warning is moot here"
    gw.stop_ok()


def test_concurrent_modalities_all_arrive(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """Four modalities send parts of the study at the same time, each on its own association."""
    study = ct_study.instances
    parts = [study[k::4] for k in range(4)]
    gw = make_gateway(orthanc)
    gw.start()
    errors: list[BaseException] = []

    def sender(k: int) -> None:
        try:
            send.storescu(gw.port, parts[k], tmp_path / f"scu{k}", called_ae=gw.ae_title, calling_ae=f"CT{k}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a storescu did not finish"
    assert not errors, errors[0]

    wait_for_instances(orthanc, len(study), timeout=180)
    status = wait_until(lambda: (s := gw.status())["sent"] == len(study) and s, 60, "all sent")
    assert status["lost"] == 0 and status["failed"] == 0 and status["duplicates_received"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    gw.stop_ok()


def thread_nices(pid: int) -> dict[str, set[int]]:
    """Thread name -> the nice values of the daemon's threads of that name (/proc/PID/task/*/stat, field 19)."""
    out: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        out.setdefault(name, set()).add(int(stat[stat.rindex(")") + 2:].split()[16]))
    return out


def spool_query(gw, sql: str) -> list[tuple]:
    """A read-only query on the running daemon's spool database (WAL: readers never block it)."""
    db = sqlite3.connect(f"file:{gw.spool_dir / 'spool.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_spool_background_work_leaves_the_cpu_to_acknowledgements(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """The pool filler creates files at nice 19 and lists them at normal priority (the listing holds the
    database connection); the compactor runs at nice 19. Instances go straight into the pre-created files."""
    gw = make_gateway(orthanc)
    gw.start()
    pid = gw.proc.pid
    wait_until(lambda: thread_nices(pid).get("spool-pool-new") == {19}, 30, "the file-creating thread at nice 19")
    nices = thread_nices(pid)
    assert nices.get("spool-compact") == {19}, nices
    assert nices.get("spool-pool") == {0}, nices
    assert nices.get("tokio-rt-worker") == {0}, nices
    # The first batch is listed (durably) before any C-STORE, so every instance below takes a pooled file.
    wait_until(lambda: spool_query(gw, "SELECT COUNT(*) FROM pool")[0][0] >= 64, 60, "the pool to be filled")

    few = ct_study.instances[:40]
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
    paths = [p for (p,) in spool_query(gw, "SELECT path FROM instances")]
    assert len(paths) == len(few), paths
    pooled = re.compile(r"objects/[0-9a-f]{2}/[0-9a-f]{32}\.dcm\.zst")
    assert all(pooled.fullmatch(p) for p in paths), f"not all in pre-created files: {paths}"

    wait_for_instances(orthanc, len(few), timeout=120)
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in few})
    gw.stop_ok()
