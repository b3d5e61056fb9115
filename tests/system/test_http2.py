"""HTTP/2 to the regional PACS (`uplink.http2`): offered by ALPN, used where the front end agrees, and
HTTP/1.1 otherwise. Real nginx in front of Orthanc, real TLS with client certificates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.orthanc import Orthanc
from harness.util import wait_until

ACCESS = re.compile(
    r'"POST /dicom-web/studies (HTTP/[0-9.]+)" (\d+) .* connection=(\d+) end=([0-9.]+) took=([0-9.]+)$'
)


def posts(orthanc: Orthanc) -> list[tuple[str, int, int]]:
    """(protocol, status, connection serial) of every STOW-RS request the front end logged."""
    return [(proto, status, conn) for proto, status, conn, _, _ in timed_posts(orthanc)]


def timed_posts(orthanc: Orthanc) -> list[tuple[str, int, int, float, float]]:
    """As `posts`, with each request's start and end (seconds, from nginx's clock)."""
    lines = (orthanc.dir / "nginx-access.log").read_text(errors="replace").splitlines()
    found = [m for line in lines if (m := ACCESS.search(line))]
    return [(m[1], int(m[2]), int(m[3]), float(m[4]) - float(m[5]), float(m[4])) for m in found]


def delivered_versions(gw) -> list[str]:
    return re.findall(r"Delivered batch\..* http_version=(\S+)", gw.log_path.read_text(errors="replace"))


@pytest.fixture
def orthanc_h2(tmp_path: Path, pki):
    o = Orthanc(dir=tmp_path / "orthanc-h2", pki=pki, http2=True)
    try:
        o.start()
        yield o
    finally:
        o.stop()


def deliver(orthanc: Orthanc, make_gateway, ct_study: Study, tmp_path: Path, http2: bool) -> object:
    """40 CT slices, stored on two associations while Orthanc is down behind its front end (so that once
    it is back, the backlog goes out as concurrent requests of 5), through a gateway with `uplink.http2`;
    returns the gateway once Orthanc holds them byte-identical and passerelled counts them sent."""
    instances = ct_study.instances[:40]
    gw = make_gateway(orthanc, extra_uplink={"http2": http2, "connections": 4, "batch_max_instances": 5})
    gw.start()
    orthanc.stop_orthanc()
    halves = (instances[::2], instances[1::2])
    for i, half in enumerate(halves):
        send.storescu(gw.port, half, tmp_path / f"scu-{i}", called_ae=gw.ae_title)
    orthanc.start_orthanc()
    wait_for_instances(orthanc, len(instances), timeout=120, what="the 40 slices")
    status = wait_until(lambda: (s := gw.status())["sent"] == len(instances) and s, 60, "40 instances counted sent")
    assert status["failed"] == 0 and status["quarantined"] == 0 and status["lost"] == 0, status
    assert_byte_identical(orthanc, send.file_reference(instances))
    return gw


def test_a_front_end_speaking_http2_gets_every_request_as_a_stream_of_one_connection(
    orthanc_h2, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    gw = deliver(orthanc_h2, make_gateway, ct_study, tmp_path, http2=True)
    stored = [r for r in timed_posts(orthanc_h2) if r[1] == 200]
    assert len(stored) >= 8, stored
    assert {proto for proto, *_ in timed_posts(orthanc_h2)} == {"HTTP/2.0"}, timed_posts(orthanc_h2)
    # The workers' requests ran side by side as streams of one connection, not one connection each.
    assert len({conn for _, _, conn, _, _ in stored}) == 1, stored
    overlapping = [(a, b) for i, a in enumerate(stored) for b in stored[i + 1 :] if a[3] < b[4] and b[3] < a[4]]
    assert overlapping, f"no two requests were in flight at once: {stored}"
    versions = delivered_versions(gw)
    assert versions and set(versions) == {"HTTP/2"}, versions
    assert "http2=offered" in gw.log_path.read_text(errors="replace")
    gw.stop_ok()


def test_a_front_end_ending_its_http2_connection_every_two_requests_loses_nothing(
    tmp_path: Path, pki, make_gateway, ct_study: Study
) -> None:
    """nginx closes an HTTP/2 connection after `keepalive_requests` requests with GOAWAY; a stream the client
    opened meanwhile is refused. Every instance must still arrive, once the uplink retried what was refused."""
    o = Orthanc(dir=tmp_path / "orthanc-goaway", pki=pki, http2=True, front_directives=["keepalive_requests 2;"])
    try:
        o.start()
        gw = deliver(o, make_gateway, ct_study, tmp_path, http2=True)
        stored = [r for r in timed_posts(o) if r[1] == 200]
        assert {proto for proto, *_ in timed_posts(o)} == {"HTTP/2.0"}, timed_posts(o)
        assert len({conn for _, _, conn, _, _ in stored}) >= 4, f"the front end did not renew its connections: {stored}"
        # A request the front end did not take is sent again at once, not met as a failure with a backoff.
        log = gw.log_path.read_text(errors="replace").splitlines()
        failed = [ln for ln in log if " WARN " in ln and "http2" in ln]
        assert not failed, "\n".join(failed)
        gw.stop_ok()
    finally:
        o.stop()


def test_http2_offered_to_a_front_end_without_it_falls_back_to_http1(
    orthanc, make_gateway, ct_study: Study, tmp_path: Path
) -> None:
    gw = deliver(orthanc, make_gateway, ct_study, tmp_path, http2=True)
    requests = posts(orthanc)
    assert requests and {proto for proto, _, _ in requests} == {"HTTP/1.1"}, requests
    versions = delivered_versions(gw)
    assert versions and set(versions) == {"HTTP/1.1"}, versions
    gw.stop_ok()


def test_http2_is_not_offered_unless_configured(orthanc_h2, make_gateway, ct_study: Study, tmp_path: Path) -> None:
    gw = deliver(orthanc_h2, make_gateway, ct_study, tmp_path, http2=False)
    requests = posts(orthanc_h2)
    assert requests and {proto for proto, _, _ in requests} == {"HTTP/1.1"}, requests
    assert "http2=off" in gw.log_path.read_text(errors="replace")
    gw.stop_ok()
