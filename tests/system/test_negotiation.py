"""Association negotiation against a real SCU (pynetdicom): a context for an unknown SOP Class is rejected
with the right reason (not a dropped socket), the others on the same association go through; a private
SOP Class listed in dicom.private_sop_classes is accepted, stored and delivered byte for byte."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Instance, Study
from harness.util import wait_until

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.9.1"
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03


def _private_instance(ct: Instance, d: Path) -> Instance:
    ds = pydicom.dcmread(ct.path)
    uid = pydicom.uid.generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    d.mkdir(parents=True, exist_ok=True)
    path = d / "private.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Instance(path=path, name=path.name, sop_class_uid=PRIVATE_SOP_CLASS, sop_instance_uid=uid,
                    study_instance_uid=str(ds.StudyInstanceUID), transfer_syntax_uid=ExplicitVRLittleEndian)  # fmt: skip


def _negotiate(port: int, ae_title: str) -> tuple[list, list]:
    from pynetdicom import AE

    ae = AE(ae_title="NEGOTIATE")
    ae.acse_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, "association with a partly unsupported proposal was not established"
    try:
        return list(assoc.accepted_contexts), list(assoc.rejected_contexts)
    finally:
        assoc.release()


def test_unknown_sop_class_context_is_rejected_with_reason(orthanc, make_gateway) -> None:
    gw = make_gateway(orthanc)
    gw.start()
    accepted, rejected = _negotiate(gw.port, gw.ae_title)
    assert [c.abstract_syntax for c in accepted] == [CTImageStorage]
    assert [c.abstract_syntax for c in rejected] == [PRIVATE_SOP_CLASS]
    assert rejected[0].result == ABSTRACT_SYNTAX_NOT_SUPPORTED, rejected[0].result
    gw.stop_ok()


def test_configured_private_sop_class_is_accepted_and_delivered(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    inst = _private_instance(ct_study.instances[0], tmp_path / "private")
    gw = make_gateway(orthanc, extra_dicom={"private_sop_classes": [PRIVATE_SOP_CLASS]})
    gw.start()
    accepted, rejected = _negotiate(gw.port, gw.ae_title)
    assert {c.abstract_syntax for c in accepted} == {CTImageStorage, PRIVATE_SOP_CLASS} and not rejected

    send.pynetdicom_send(gw.port, [inst], called_ae=gw.ae_title)
    wait_for_instances(orthanc, 1, timeout=60, what="the private SOP Class instance")
    wait_until(lambda: gw.status()["sent"] == 1, 60, "the private instance to be confirmed")
    assert_byte_identical(orthanc, send.file_reference([inst]))
    gw.stop_ok()
