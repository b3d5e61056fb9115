"""Permanent upstream refusals: an instance the PACS refuses for good goes to `failed`, stays visible
(never deleted), and `passerelled requeue` puts it back in the queue."""

from __future__ import annotations

from pathlib import Path

import pydicom

from harness import send
from harness.checks import wait_for_instances
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
