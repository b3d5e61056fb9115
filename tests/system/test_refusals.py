"""4. Refusals: a wrong called AE title or a calling AE title that is not allowed gets an association
rejection (and the daemon keeps serving); a bad configuration is refused key by key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom

from harness import send
from harness.checks import wait_for_instances
from harness.data import Instance, Study
from harness.gateway import passerelled_bin
from harness.part10 import file_dataset_bytes
from harness.pki import make_client_cert
from harness.util import run, wait_until


def test_wrong_called_or_calling_ae_is_rejected_and_the_daemon_keeps_serving(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    gw = make_gateway(orthanc, allowed_calling_ae_titles=["CT1", "MODALITY1"])
    gw.start()

    wrong_called = send.echoscu(gw.port, called_ae="NOT_PASSERELLE", calling_ae="CT1")
    assert wrong_called.returncode != 0
    assert "Rejected" in wrong_called.stdout + wrong_called.stderr, wrong_called

    intruder = send.echoscu(gw.port, called_ae=gw.ae_title, calling_ae="INTRUDER")
    assert intruder.returncode != 0
    assert "Rejected" in intruder.stdout + intruder.stderr, intruder

    refused = send.storescu(gw.port, ct_study.instances[:3], tmp_path / "intruder", called_ae=gw.ae_title,
                            calling_ae="INTRUDER", check=False)  # fmt: skip
    assert refused.ok == 0, refused.output[-2000:]
    assert "Rejected" in refused.output, refused.output[-2000:]

    # Still serving the allowed modalities.
    assert gw.running
    assert send.echoscu(gw.port, called_ae=gw.ae_title, calling_ae="CT1").returncode == 0
    send.storescu(gw.port, ct_study.instances[:3], tmp_path / "ct1", called_ae=gw.ae_title, calling_ae="CT1")
    wait_for_instances(orthanc, 3, timeout=60)
    status = wait_until(lambda: (s := gw.status())["sent"] == 3 and s, 30, "3 instances sent")
    assert status["queued"] == 0 and status["failed"] == 0, status
    # The refusal was logged naming the peer.
    log = gw.log_path.read_text(errors="replace")
    assert "INTRUDER" in log and "127.0.0.1" in log, gw.log_excerpt()
    gw.stop_ok()


def test_dataset_that_does_not_match_its_command_is_refused(
    orthanc, make_gateway, real_files, ct_study: Study, tmp_path: Path
) -> None:
    """rtplan.dcm's file meta names another SOP Instance UID than its dataset; sent straight from the file,
    the C-STORE command carries the meta's UID, so the dataset does not match its command."""
    rtplan = next(i for i in real_files if i.name == "rtplan.dcm")
    meta_uid = str(pydicom.dcmread(rtplan.path, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
    assert meta_uid != rtplan.sop_instance_uid
    gw = make_gateway(orthanc)
    gw.start()

    statuses = send.pynetdicom_send(gw.port, [rtplan], called_ae=gw.ae_title, check=False)
    assert statuses[0] != 0x0000, "a mismatching dataset was acknowledged as stored"
    assert statuses[0] in (0xA900, 0xC000) or 0xA900 <= statuses[0] <= 0xCFFF, hex(statuses[0])

    # Nothing was queued for it, and the daemon goes on serving.
    send.storescu(gw.port, ct_study.instances[:2], tmp_path / "after", called_ae=gw.ae_title)
    status = wait_until(lambda: (s := gw.status())["sent"] == 2 and s, 60, "the next instances to be sent")
    assert status["queued"] + status["uploading"] + status["failed"] == 0, status
    assert orthanc.count_instances() == 2
    gw.stop_ok()


def _a_cut_copy_is_refused_then_the_whole_file_is_forwarded(
    orthanc, make_gateway, whole: Instance, cut_at: int, tmp_path: Path, log_says: list[str]
) -> None:
    """pynetdicom sends `whole`'s file cut at byte `cut_at`, straight from the file (it does not parse
    the data set): the gateway answers 0xC000 and logs a line containing each of `log_says`. The whole
    file, sent next on a new association, is stored and forwarded: nothing of the cut copy was queued,
    and it did not count as a duplicate of the whole one."""
    cut = tmp_path / f"cut-{whole.name}"
    cut.write_bytes(whole.path.read_bytes()[:cut_at])
    truncated = dataclasses.replace(whole, path=cut, name=cut.name)
    gw = make_gateway(orthanc)
    gw.start()

    statuses = send.pynetdicom_send(gw.port, [truncated], called_ae=gw.ae_title, check=False)
    assert statuses == [0xC000], [hex(s) for s in statuses]
    log = gw.log_path.read_text(errors="replace")
    for words in log_says:
        assert words in log, gw.log_excerpt()

    assert send.pynetdicom_send(gw.port, [whole], called_ae=gw.ae_title) == [0x0000]
    status = wait_until(lambda: (s := gw.status())["sent"] == 1 and s, 60, "the whole instance to be sent")
    assert status["queued"] + status["uploading"] + status["failed"] == 0, status
    assert orthanc.count_instances() == 1
    gw.stop_ok()


def test_a_dataset_cut_short_is_refused_and_nothing_of_it_is_forwarded(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    """A modality that marks its last fragment too early, or sends a file cut short, must not get a
    success: a CT file cut inside its Pixel Data gets 0xC000 (cannot understand), nothing is queued,
    and the log names the instance and what happened."""
    whole = ct_study.instances[0]
    data = whole.path.read_bytes()
    pixel_data = data.rfind(b"\xe0\x7f\x10\x00")
    assert pixel_data > 0, "the CT file has a Pixel Data element"
    # Even, and well inside the pixel values: every element header before the cut is whole.
    cut_at = pixel_data + 12 + (len(data) - pixel_data - 12) // 2 // 2 * 2
    _a_cut_copy_is_refused_then_the_whole_file_is_forwarded(
        orthanc, make_gateway, whole, cut_at, tmp_path, [whole.sop_instance_uid, "truncated"]
    )


def test_a_deflated_data_set_cut_short_is_refused_and_the_whole_one_is_forwarded(
    orthanc, make_gateway, real_files, tmp_path: Path
) -> None:
    """The same for a deflated data set (pydicom's real-world image_dfl.dcm): its deflate stream cut in
    the middle never ends, and the gateway, which inflates it as it arrives only to check it, answers
    0xC000; the whole file is stored and forwarded."""
    whole = next(i for i in real_files if i.name == "image_dfl.dcm")
    assert whole.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    dataset = len(file_dataset_bytes(whole.path))
    # Half of the deflated data set, even: the file meta before it is whole.
    cut_at = whole.path.stat().st_size - dataset + dataset // 2 // 2 * 2
    _a_cut_copy_is_refused_then_the_whole_file_is_forwarded(
        orthanc, make_gateway, whole, cut_at, tmp_path, [whole.sop_instance_uid, "deflate stream"]
    )


GOOD = """
[dicom]
ae_title = "PASSERELLE"
listen = "127.0.0.1:11112"
[spool]
dir = "{spool}"
min_free_mb = 64
[uplink]
stow_url = "https://localhost:8443/dicom-web/studies"
ca_file = "{ca}"
[admin]
listen = "127.0.0.1:8443"
"""

BAD = """
[dicom]
ae_title = "THIS_AE_TITLE_IS_FAR_TOO_LONG"
listen = "not an address"
max_associations = 0
[spool]
dir = "relative/spool"
min_free_mb = 0
[uplink]
stow_url = "http://pacs.example.org/dicom-web/studies"
ca_file = "/nonexistent/ca.pem"
[admin]
listen = "127.0.0.1:8443"
"""

BAD_KEYS = ["dicom.ae_title", "dicom.listen", "dicom.max_associations", "spool.dir", "spool.min_free_mb",
            "uplink.stow_url", "uplink.ca_file"]  # fmt: skip


def _check_config(path: Path):
    return run([str(passerelled_bin()), "check-config", "--config", str(path)], check=False)


def test_check_config_accepts_a_good_config(pki, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD.format(spool=tmp_path / "spool", ca=pki.ca_cert))
    cp = _check_config(good)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "client certificate" not in cp.stdout, cp.stdout

    # With a client certificate, the operator who just installed one sees its end date; one close to it
    # is announced, and is still not a configuration error (the box keeps receiving meanwhile).
    for days, said in ((365, "client certificate: valid until"), (10, "client certificate: EXPIRES SOON")):
        cert, key = make_client_cert(pki, tmp_path / "certs", f"client-{days}", days=days)
        with_cert = tmp_path / f"with-cert-{days}.toml"
        with_cert.write_text(good.read_text().replace(
            "[admin]", f'client_cert = "{cert}"\nclient_key = "{key}"\n[admin]'))
        cp = _check_config(with_cert)
        assert cp.returncode == 0 and said in cp.stdout, (days, cp.stdout + cp.stderr)


def test_check_config_names_each_bad_key_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    cp = _check_config(bad)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    lines = out.splitlines()
    for key in BAD_KEYS:
        assert any(key in line for line in lines), f"no line names {key}:\n{out}"
    # One line per bad key, each with a fix.
    assert sum(1 for line in lines if "Fix:" in line) >= len(BAD_KEYS), out

    # The daemon refuses to start on it, and says why.
    daemon = run([str(passerelled_bin()), "--config", str(bad)], check=False, timeout=30)
    assert daemon.returncode != 0
    assert "dicom.ae_title" in daemon.stdout + daemon.stderr


def test_check_config_names_an_unknown_key(pki, tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text(GOOD.format(spool=tmp_path / "spool", ca=pki.ca_cert).replace("min_free_mb", "min_fre_mb"))
    cp = _check_config(typo)
    assert cp.returncode != 0
    assert "min_fre_mb" in cp.stdout + cp.stderr
