"""Permanent upstream refusals: an instance the PACS refuses for good goes to `failed`, stays visible
(never deleted), and `passerelled requeue` puts it back in the queue."""

from __future__ import annotations

from pathlib import Path

import pydicom

from harness import send
from harness.checks import assert_all_delivered, wait_for_instances
from harness.data import Instance, Study, pydicom_test_files_dir
from harness.util import wait_until


def _no_study_uid_instance(tmp_path: Path) -> Instance:
    """A bundled real-world file without a Study Instance UID: Orthanc refuses it (400, FailureReason C000)."""
    src = pydicom_test_files_dir() / "JPEGLSNearLossless_16.dcm"
    dst = tmp_path / src.name
    dst.write_bytes(src.read_bytes())
    ds = pydicom.dcmread(dst, stop_before_pixels=True)
    assert "StudyInstanceUID" not in ds
    return Instance(
        path=dst,
        name=src.name,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid="",
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def test_refused_instance_is_failed_visible_and_can_be_requeued(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    bad = _no_study_uid_instance(tmp_path)
    good = ct_study.instances[:3]
    gw = make_gateway(orthanc)
    gw.start()
    send.storescu(gw.port, [bad], tmp_path / "scu-bad", called_ae=gw.ae_title)
    send.storescu(gw.port, good, tmp_path / "scu-good", called_ae=gw.ae_title)

    status = wait_until(
        lambda: (s := gw.status())["failed"] == 1 and s["sent"] == len(good) and s,
        60,
        "the refused instance to be failed and the others sent",
    )
    assert status["queued"] == 0 and status["lost"] == 0, status
    assert status["last_error"], status
    assert orthanc.count_instances() == len(good)
    posts_before = _stow_posts(orthanc)

    cp = gw.cli("requeue", "--config", str(gw.config_path), "--sop-instance-uid", bad.sop_instance_uid)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1" in cp.stdout, cp.stdout
    # The daemon tries it again (one more STOW-RS request), and it is refused again: failed, not lost.
    wait_until(lambda: _stow_posts(orthanc) > posts_before, 60, "the re-queued instance to be uploaded again")
    status = wait_until(
        lambda: (s := gw.status())["failed"] == 1 and s["queued"] + s["uploading"] == 0 and s,
        60,
        "the re-queued instance to be refused again",
    )
    assert status["sent"] == len(good) and status["lost"] == 0, status
    wait_for_instances(orthanc, len(good), timeout=5)
    gw.stop_ok()


def _stow_posts(orthanc) -> int:
    return (orthanc.dir / "nginx-access.log").read_text(errors="replace").count("POST /dicom-web/studies")


def test_a_stow_url_that_is_not_stow_rs_pauses_and_fails_nothing(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """uplink.stow_url points at Orthanc's REST upload (/instances) instead of its STOW-RS endpoint. Orthanc
    answers each multipart request 400 "Bad file format", without a STOW-RS response. Failing the instances
    would fail the whole backlog, batch by batch: the uplink splits the batch (to isolate an instance the PACS
    might refuse), and as the PACS has stored nothing since start, pauses naming uplink.stow_url. Fixed and
    restarted, everything is delivered."""
    few = ct_study.instances[:8]
    gw = make_gateway(orthanc)
    gw.stow_url = orthanc.base_url + "/instances"
    gw.write_config()
    gw.start()
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
    status = wait_until(lambda: (s := gw.status())["paused_until"] and s, 60, "the uplink to pause")
    assert "uplink.stow_url" in status["last_error"] and "Bad file format" in status["last_error"], status
    assert status["failed"] == 0 and status["sent"] == 0 and status["lost"] == 0, status
    assert status["queued"] + status["uploading"] == len(few), status
    assert orthanc.count_instances() == 0
    gw.stop_ok()
    assert "refused an instance for good" not in gw.log_path.read_text(errors="replace")

    gw.stow_url = orthanc.stow_url
    gw.write_config()
    gw.start()
    assert_all_delivered(gw, orthanc, few, storescu_reference, "the queue after stow_url was fixed")
    gw.stop_ok()
