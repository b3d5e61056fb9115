"""The harness itself against the real peers, without the daemon: proves that Orthanc behind the nginx
TLS front stores what a STOW-RS client posts byte for byte, and that the wire references are right.
If these fail, the daemon tests cannot be trusted."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests

from harness import send
from harness.checks import assert_byte_identical
from harness.data import TRANSFER_SYNTAX_NAMES, Instance, Study
from harness.orthanc import Orthanc
from harness.part10 import dataset_bytes, file_dataset_bytes, meta_end_offset


def test_generated_ct_study_is_one_realistic_series(ct_study: Study) -> None:
    assert len(ct_study.instances) >= 200
    first = pydicom.dcmread(ct_study.instances[0].path)
    mid = pydicom.dcmread(ct_study.instances[len(ct_study.instances) // 2].path)
    assert (first.Rows, first.Columns, first.BitsAllocated) == (256, 256, 16)
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    uids = {pydicom.dcmread(i.path, stop_before_pixels=True).SOPInstanceUID for i in ct_study.instances}
    assert len(uids) == len(ct_study.instances)
    for ds in (first, mid):
        assert ds.StudyInstanceUID == ct_study.study_instance_uid
        px = ds.pixel_array.astype(float)
        # Smooth anatomy: many distinct values, mostly small neighbour differences, air around the body.
        assert len(set(px.ravel().tolist())) > 200
        assert abs(px[:, 1:] - px[:, :-1]).mean() < 40
        assert px[0, 0] < 100 and px[128, 128] > 900


def test_real_world_files_cover_the_transfer_syntaxes(real_files: list[Instance]) -> None:
    names = {TRANSFER_SYNTAX_NAMES.get(i.transfer_syntax_uid, i.transfer_syntax_uid) for i in real_files}
    for wanted in [
        "Implicit VR Little Endian", "Explicit VR Little Endian", "Explicit VR Big Endian",
        "Deflated Explicit VR Little Endian", "RLE Lossless", "JPEG Baseline", "JPEG Lossless SV1",
        "JPEG-LS Lossless", "JPEG 2000", "JPEG 2000 Lossless",
    ]:  # fmt: skip
        assert wanted in names
    assert len({i.sop_instance_uid for i in real_files}) == len(real_files)
    assert any(int(pydicom.dcmread(i.path, stop_before_pixels=True).get("NumberOfFrames", 1)) > 1 for i in real_files)


def test_dataset_offset_follows_the_meta_group_length(real_files: list[Instance]) -> None:
    for inst in real_files:
        data = inst.path.read_bytes()
        end = meta_end_offset(data)
        with open(inst.path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert ds.file_meta  # pydicom agrees that the file has a meta group
        assert data[end : end + 2] != b"\x02\x00"
        assert dataset_bytes(data) == data[end:]


def test_orthanc_requires_client_certificate_and_password(orthanc: Orthanc) -> None:
    with requests.Session() as s:
        s.trust_env = False
        no_cert = s.get(orthanc.base_url + "/system", verify=str(orthanc.pki.ca_cert), timeout=10)
        assert no_cert.status_code == 400  # nginx: no required SSL certificate was sent
        s.cert = (str(orthanc.pki.client_cert), str(orthanc.pki.client_key))
        no_password = s.get(orthanc.base_url + "/system", verify=str(orthanc.pki.ca_cert), timeout=10)
        assert no_password.status_code == 401
        with pytest.raises(requests.exceptions.SSLError):
            s.get(orthanc.base_url + "/system", verify=str(orthanc.pki.other_ca_cert), timeout=10)


def test_direct_stow_is_stored_byte_for_byte(orthanc: Orthanc, real_files: list[Instance], ct_study: Study,
                                              tmp_path: Path) -> None:
    """What storescu puts on the wire (captured by storescp +B) and what pynetdicom sends from the file,
    POSTed directly as STOW-RS, comes back from Orthanc byte-identical after group 0002."""
    by_storescu = ct_study.instances[:20] + real_files[::2]
    by_pynetdicom = [i for i in real_files[1::2] if send.pynetdicom_sendable(i)]

    rx = send.ReferenceReceiver(tmp_path / "rx").start()
    try:
        send.storescu(rx.port, by_storescu, tmp_path / "scu", called_ae=rx.ae_title)
        send.pynetdicom_send(rx.port, by_pynetdicom, called_ae=rx.ae_title)
        wire = rx.received()
        files = {p: p.read_bytes() for p in (rx.dir / "in").iterdir()}
    finally:
        rx.stop()

    # pynetdicom sends the file's own dataset bytes.
    for inst in by_pynetdicom:
        assert wire[inst.sop_instance_uid] == file_dataset_bytes(inst.path), inst.name

    r = orthanc.stow(list(files.values()))
    assert r.status_code == 200, r.text[:2000]
    expected = {i.sop_instance_uid: wire[i.sop_instance_uid] for i in by_storescu + by_pynetdicom}
    assert_byte_identical(orthanc, expected)
