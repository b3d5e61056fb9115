"""3. An upstream outage while a modality is sending delays delivery but loses nothing; so does a PACS that
answers but cannot store (its disk is full)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path

import pytest

from harness import send
from harness.checks import assert_all_delivered, assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.orthanc import Orthanc
from harness.util import run, wait_until


def test_orthanc_outage_delays_but_loses_nothing(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    study = ct_study.instances
    n = len(study)
    first, second = study[: n // 2], study[n // 2 :]
    gw = make_gateway(orthanc, extra_uplink={"batch_max_instances": 10})
    gw.start()

    send.storescu(gw.port, first, tmp_path / "scu1", called_ae=gw.ae_title)
    wait_for_instances(orthanc, len(first), timeout=120, what="the first half, before the outage")

    # The PACS goes down (nginx then answers 502 Bad Gateway); the modality goes on sending, and every
    # C-STORE is still acknowledged.
    orthanc.stop_orthanc()
    send.storescu(gw.port, second, tmp_path / "scu2", called_ae=gw.ae_title)

    # The outage is visible to the operator and nothing is dropped.
    status = wait_until(
        lambda: (s := gw.status())["last_error"] and s["queued"] + s["uploading"] > 0 and s,
        60,
        "status to show the upstream error with instances waiting",
    )
    assert status["lost"] == 0 and status["failed"] == 0, status
    assert status["queued"] + status["uploading"] + status["sent"] == n, status
    assert status["oldest_queued_age_secs"] is not None, status
    # Stay down "for a while": until the oldest waiting instance has waited longer than retry_max_secs,
    # so several retry rounds have failed. Still nothing lost or failed.
    status = wait_until(
        lambda: (s := gw.status())["oldest_queued_age_secs"] is not None and s["oldest_queued_age_secs"] >= 6 and s,
        60,
        "the outage to last a few retry rounds",
    )
    assert status["lost"] == 0 and status["failed"] == 0 and status["sent"] < n, status
    assert status["last_error"], status
    # Meanwhile the spool compresses what it stored as received (its compactor runs once ingest
    # pauses); the byte-identity check below then reads compacted files.
    status = wait_until(
        lambda: (s := gw.status())["awaiting_compaction"] == 0 and s,
        60,
        "the waiting instances to be compressed at rest",
    )
    assert status["stored_bytes"] * 3 < status["raw_bytes"] * 2, status

    orthanc.start_orthanc()
    wait_for_instances(orthanc, n, timeout=180, what="everything after the outage")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert status["lost"] == 0 and status["failed"] == 0 and status["queued"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    gw.stop_ok()


def test_a_correction_sent_during_an_outage_reaches_an_overwriting_pacs_after_its_original(
    pki, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    """A modality sends an instance while the PACS is down, then a correction of it (same SOP Instance UID,
    other content). The original waits for its retry, the correction is due at once; a PACS that replaces an
    instance stored again (Orthanc with OverwriteInstances) keeps whichever it receives last. passerelled
    sends the versions of one UID in the order they arrived, so the PACS ends with the correction."""
    import pydicom

    pacs = Orthanc(dir=tmp_path / "pacs", pki=pki, overwrite_instances=True)
    try:
        pacs.start()
        one = ct_study.instances[0]
        # The original's retry (and the uplink's hold) comes 8 s after its failure: the correction arrives and
        # the PACS is back before then.
        gw = make_gateway(pacs, extra_uplink={"retry_base_secs": 8, "retry_max_secs": 16})
        gw.start()
        pacs.stop_orthanc()
        send.storescu(gw.port, [one], tmp_path / "original", called_ae=gw.ae_title)
        wait_until(lambda: (s := gw.status())["last_error"] and s["queued"] == 1 and s, 30,
                   "the original to fail against the PACS that is down")  # fmt: skip

        ds = pydicom.dcmread(one.path)
        ds.SeriesDescription = "CORRECTED"
        corrected = tmp_path / "corrected.dcm"
        ds.save_as(corrected, enforce_file_format=True)
        fixed = dataclasses.replace(one, path=corrected, name="corrected.dcm")
        send.storescu(gw.port, [fixed], tmp_path / "correction", called_ae=gw.ae_title)
        pacs.start_orthanc()

        status = wait_until(lambda: (s := gw.status())["sent"] == 2 and s, 90, "both versions to be confirmed")
        assert status["failed"] == 0 and status["lost"] == 0 and status["queued"] == 0, status
        with pacs.session() as s:
            [iid] = pacs.sop_instance_uids().values()
            tags = s.get(f"{pacs.base_url}/instances/{iid}/simplified-tags", timeout=30).json()
        assert tags.get("SeriesDescription") == "CORRECTED", (
            "the PACS ended with the original: it was sent after its correction"
        )
        gw.stop_ok()
    finally:
        pacs.stop()


FILLER = "storage/filler"


@pytest.fixture
def pacs_with_full_disk(pki, tmp_path: Path):
    """Orthanc whose storage area is a 16 MiB tmpfs filled up by another file (`.filler`): it answers STOW-RS
    but cannot store. Deleting the filler (`FILLER` under its directory) gives the space back. Needs root, as
    CI runs."""
    if os.geteuid() != 0:
        pytest.fail("This case mounts a tmpfs for Orthanc's storage and must run as root (as CI does).")
    pacs = Orthanc(dir=tmp_path / "pacs", pki=pki)
    storage = pacs.dir / "storage"
    storage.mkdir(parents=True)
    run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(storage)])
    filler = pacs.dir / FILLER
    try:
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        pacs.start()
        yield pacs
    finally:
        pacs.stop()
        if subprocess.run(["umount", str(storage)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(storage)], capture_output=True)


def test_a_pacs_that_cannot_store_holds_the_uplink_and_loses_nothing(
    pacs_with_full_disk, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """The PACS's disk is full. Orthanc still answers each STOW-RS request, HTTP 200 with neither
    ReferencedSOPSequence nor FailedSOPSequence listing anything. Nothing is confirmed, so nothing is
    deleted; nothing is failed for good either. The uplink treats it as the upstream not taking requests
    (it holds every upload, like for a 5xx) and says the PACS stored nothing. Once the PACS has space again,
    everything is delivered byte-identical."""
    pacs = pacs_with_full_disk
    few = ct_study.instances[:20]
    gw = make_gateway(pacs)
    gw.start()
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)

    status = wait_until(lambda: "stored nothing" in ((s := gw.status())["last_error"] or "") and s, 60,
                        "status to say the PACS stored nothing")
    assert "full disk" in status["last_error"], status
    assert status["sent"] == 0 and status["failed"] == 0 and status["lost"] == 0, status
    assert status["queued"] + status["uploading"] == len(few), status
    assert pacs.count_instances() == 0
    wait_until(lambda: "Holding all uploads until the PACS answers again" in gw.log_path.read_text(errors="replace"),
               60, "the uplink to hold every upload")

    (pacs.dir / FILLER).unlink()  # the PACS's operator frees space
    assert_all_delivered(gw, pacs, few, storescu_reference, "everything once the PACS has space again")
    gw.stop_ok()
