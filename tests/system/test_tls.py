"""5. TLS and credentials: the daemon trusts only its ca_file. With another CA it never delivers, keeps
everything queued, and shows a certificate error; CA variables in the environment change nothing. A wrong
password, or a client certificate the PACS does not accept, pauses the uplink instead of retrying in a loop
or failing the instances. Fixing the config and restarting delivers all."""

from __future__ import annotations

import time
from pathlib import Path

from harness import send
from harness.checks import assert_all_delivered
from harness.orthanc import PASSWORD, Orthanc
from harness.pki import make_client_cert, make_self_signed_server_cert
from harness.data import Study
from harness.util import wait_until


def test_untrusted_server_certificate_never_delivers_and_loses_nothing(
    orthanc, make_gateway, pki, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    real_ca = str(pki.ca_cert)
    gw = make_gateway(
        orthanc,
        ca_file=pki.other_ca_cert,
        env={
            "REQUESTS_CA_BUNDLE": real_ca,
            "SSL_CERT_FILE": real_ca,
            "SSL_CERT_DIR": str(pki.dir),
            "CURL_CA_BUNDLE": real_ca,
            "NIX_SSL_CERT_FILE": real_ca,
        },
    )
    gw.start()
    few = ct_study.instances[:10]
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)  # acknowledged: stored durably

    status = wait_until(
        lambda: (s := gw.status())["last_error"] and s,
        60,
        "status to show the TLS failure",
    )
    error = status["last_error"].lower()
    assert "certificate" in error or "cert" in error or "tls" in error, status
    assert status["paused_until"] is not None, f"a certificate failure should pause the uplink: {status}"
    assert status["sent"] == 0 and status["lost"] == 0 and status["failed"] == 0, status
    assert status["queued"] + status["uploading"] == len(few), status

    assert orthanc.count_instances() == 0
    access_log = (orthanc.dir / "nginx-access.log").read_text(errors="replace")
    assert "POST" not in access_log, access_log[-2000:]

    gw.stop_ok()
    status = gw.status()
    assert status["queued"] == len(few) and status["lost"] == 0, status

    # The operator fixes ca_file and restarts: everything that waited is delivered.
    gw.ca_file = pki.ca_cert
    gw.write_config()
    gw.start()
    status = assert_all_delivered(gw, orthanc, few, storescu_reference, "the queue after the CA was fixed")
    assert status["paused_until"] is None, status
    gw.stop_ok()


def test_wrong_password_pauses_the_uplink_and_loses_nothing(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    gw = make_gateway(orthanc)
    gw.password = "not-the-password"
    gw.write_config()
    gw.start()
    few = ct_study.instances[:5]
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
    status = wait_until(lambda: (s := gw.status())["paused_until"] and s, 60, "the uplink to pause on 401")
    assert status["last_error"], status
    assert status["sent"] == 0 and status["failed"] == 0 and status["lost"] == 0, status
    assert status["queued"] + status["uploading"] == len(few), status
    assert orthanc.count_instances() == 0
    # Paused means no retry loop: once paused, no further request reaches the PACS, even after longer
    # than retry_max_secs (4 s), when a retrying uplink would have tried again.
    posts = _stow_posts(orthanc)
    assert 1 <= posts <= len(few), f"{posts} STOW-RS requests before the pause"
    wait_until(lambda: (gw.status()["oldest_queued_age_secs"] or 0) >= 6, 30, "time to pass while paused")
    assert _stow_posts(orthanc) == posts, "the uplink kept sending while paused"
    assert gw.status()["paused_until"], "the pause ended early"
    gw.stop_ok()

    gw.password = PASSWORD
    gw.write_config()
    gw.start()
    assert_all_delivered(gw, orthanc, few, storescu_reference, "the queue after the password was fixed")
    gw.stop_ok()
    log = gw.log_path.read_text(errors="replace")
    assert PASSWORD not in log and "not-the-password" not in log, "a password reached the log"


def test_refused_client_certificate_pauses_the_uplink_and_fails_no_instance(
    orthanc, make_gateway, pki, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """The box's client certificate has expired, comes from a CA the PACS does not trust, or is missing. nginx
    (`ssl_verify_client on`) completes the handshake anyway and answers each request with HTTP 400 "The
    SSL certificate error". That is the box's configuration, not the instances: the uplink pauses with a
    message naming uplink.client_cert, and no instance is failed (which would need a `requeue` of the whole
    backlog) or lost. With a valid certificate and a restart, everything is delivered."""
    gw = make_gateway(orthanc)
    # (what, certificate and key, what the pause's message must quote)
    cases = [
        ("expired", make_client_cert(pki, tmp_path / "certs", "expired-client", expired=True),
         "The SSL certificate error"),
        ("foreign CA", make_client_cert(pki, tmp_path / "certs", "foreign-client", foreign_ca=True),
         "The SSL certificate error"),
        # None configured: the front end's 400, or (TLS 1.3) the connection it closed under the body.
        ("none", (None, None), ""),
    ]
    held: list = []
    for k, (what, (cert, key), quoted) in enumerate(cases):
        gw.client_cert, gw.client_key = cert, key
        gw.write_config()
        gw.start()
        batch = ct_study.instances[6 * k:6 * k + 6]
        send.storescu(gw.port, batch, tmp_path / f"scu-{k}", called_ae=gw.ae_title)
        held += batch
        status = wait_until(lambda: (s := gw.status())["paused_until"] and s, 60, f"the uplink to pause ({what})")
        assert "uplink.client_cert" in status["last_error"], status
        assert quoted in status["last_error"], status
        assert status["failed"] == 0 and status["sent"] == 0 and status["lost"] == 0, (what, status)
        assert status["queued"] + status["uploading"] == len(held), (what, status)
        assert orthanc.count_instances() == 0
        if what == "expired":
            # Said at start, before any upload failed, and shown by status.
            assert "The box's TLS client certificate has expired" in gw.log_path.read_text(errors="replace")
            assert status["client_cert_not_after"] < time.time(), status
            assert "client certificate: EXPIRED on" in gw.status_text()
        gw.stop_ok()
        assert gw.status()["queued"] == len(held), what
    access_log = (orthanc.dir / "nginx-access.log").read_text(errors="replace")
    assert '"POST /dicom-web/studies HTTP/1.1" 400' in access_log, access_log[-2000:]
    log = gw.log_path.read_text(errors="replace")
    assert "refused an instance for good" not in log, "an instance was failed over the certificate"

    gw.client_cert, gw.client_key = pki.client_cert, pki.client_key
    gw.write_config()
    gw.start()
    assert_all_delivered(gw, orthanc, held, storescu_reference, "the queue after the client certificate was fixed")
    gw.stop_ok()


def test_a_client_certificate_close_to_its_expiry_is_announced_while_it_still_works(
    orthanc, make_gateway, pki, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """The box's client certificate expires in 10 days. Uploads go on, but the operator hears it at start
    (a WARN naming uplink.client_cert and what to do) and in `status`, before the PACS starts refusing: a
    hospital otherwise learns of it from doctors missing studies. A certificate valid for a year says nothing."""
    cert, key = make_client_cert(pki, tmp_path / "certs", "ten-days", days=10)
    gw = make_gateway(orthanc, client_cert=cert, client_key=key)
    gw.start()
    few = ct_study.instances[:3]
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
    status = assert_all_delivered(gw, orthanc, few, storescu_reference, "uploads with a certificate close to expiry")
    assert abs(status["client_cert_not_after"] - (time.time() + 10 * 86_400)) < 3600, status
    assert status["client_cert_error"] is None, status
    log = gw.log_path.read_text(errors="replace")
    warned = [ln for ln in log.splitlines() if " WARN " in ln and "client certificate expires in" in ln]
    assert len(warned) == 1 and "9 day(s)" in warned[0], warned
    assert "uplink.client_cert" in warned[0] and "renewed" in warned[0], warned
    assert "EXPIRES SOON" in gw.status_text()
    gw.stop_ok()

    # A year's certificate (the test PKI's): no warning, and status gives its date.
    gw.client_cert, gw.client_key = pki.client_cert, pki.client_key
    gw.write_config()
    gw.start()
    assert "client certificate: valid until" in gw.status_text()
    gw.stop_ok()
    last_run = gw.log_path.read_text(errors="replace").split("===== start #")[-1]
    assert "Uplink started" in last_run and "client certificate expires" not in last_run, last_run[-2000:]


def test_self_signed_ca_certificate_pauses_with_how_to_make_one_that_works(
    make_gateway, pki, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """The PACS's front end uses a self-signed certificate made as `openssl req -x509` makes it by default
    (CA:TRUE), and the operator put it in ca_file. rustls never accepts a CA certificate as a server
    certificate: the pause says so and how to make one that works, not "check ca_file" (which holds the right
    certificate). Made that way (CA:FALSE) and pinned the same way, the instances are delivered."""
    few = ct_study.instances[:3]
    for ca_false in (False, True):
        cert, key = make_self_signed_server_cert(tmp_path / "certs", f"self-signed-{ca_false}", ca_false=ca_false)
        pacs = Orthanc(dir=tmp_path / f"orthanc-{ca_false}", pki=pki, server_cert=cert, server_key=key)
        try:
            pacs.start()
            gw = make_gateway(pacs, name=f"gateway-{ca_false}", ca_file=cert)
            gw.start()
            send.storescu(gw.port, few, tmp_path / f"scu-{ca_false}", called_ae=gw.ae_title)
            if not ca_false:
                status = wait_until(lambda: (s := gw.status())["paused_until"] and s, 60, "the uplink to pause")
                assert "CA:TRUE" in status["last_error"] and "CA:FALSE" in status["last_error"], status
                assert status["failed"] == 0 and status["sent"] == 0 and status["lost"] == 0, status
                assert status["queued"] + status["uploading"] == len(few), status
                assert "POST" not in (pacs.dir / "nginx-access.log").read_text(errors="replace")
            else:
                assert_all_delivered(gw, pacs, few, storescu_reference, "delivery to a pinned CA:FALSE certificate")
            gw.stop_ok()
        finally:
            pacs.stop()


def test_server_certificate_for_another_host_name_is_refused(
    make_gateway, pki, ct_study: Study, tmp_path: Path
) -> None:
    """The PACS's certificate is issued by the trusted CA but for pacs.example.org, not localhost: the host
    name check refuses it."""
    wrong = Orthanc(dir=tmp_path / "orthanc-wrong-name", pki=pki, server_cert=pki.wrong_name_cert,
                    server_key=pki.wrong_name_key)  # fmt: skip
    try:
        wrong.start()
        gw = make_gateway(wrong)
        gw.start()
        few = ct_study.instances[:3]
        send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
        status = wait_until(lambda: (s := gw.status())["paused_until"] and s, 60, "the uplink to pause")
        assert status["last_error"] and "cert" in status["last_error"].lower(), status
        assert status["sent"] == 0 and status["lost"] == 0, status
        assert status["queued"] + status["uploading"] == len(few), status
        assert wrong.count_instances() == 0
        assert "POST" not in (wrong.dir / "nginx-access.log").read_text(errors="replace")
        gw.stop_ok()
    finally:
        wrong.stop()


def _stow_posts(orthanc: Orthanc) -> int:
    return (orthanc.dir / "nginx-access.log").read_text(errors="replace").count("POST /dicom-web/studies")
