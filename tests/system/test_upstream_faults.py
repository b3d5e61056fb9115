"""Upstream faults: a fault-injecting proxy (tests/faultproxy) sits between passerelled and the regional
PACS (Orthanc behind nginx TLS). For every case the test checks what the uplink does (attempts and their
timing, counted at the proxy), what the operator sees (`passerelled status --json` and the daemon's log),
and that nothing is lost: once the fault is removed, every instance arrives in Orthanc, or it stays
`failed`, visible, and `passerelled requeue` brings it there.

One Orthanc serves the whole module; each case has its own daemon, spool, proxy and study. The figures
(cases run and passed, each case's result) go to tests/.work/figures/upstream.json.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

import pytest

from faultproxy import FaultProxy, Response, expired_server_cert, fail_instances, omit_instances
from harness import data, send
from harness.gateway import Gateway
from harness.orthanc import Orthanc
from harness.util import free_port, wait_until

FIGURES = Path(__file__).resolve().parents[1] / ".work" / "figures" / "upstream.json"
IDLE = 3
RETRY_BASE, RETRY_MAX = 1, 3
UPLINK = {"retry_base_secs": RETRY_BASE, "retry_max_secs": RETRY_MAX, "idle_timeout_secs": IDLE}

_results: dict[str, str] = {}
# Instances acknowledged to the modality, and of those, found in Orthanc at the end of their case.
_counts = {"acknowledged": 0, "delivered": 0}


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, pki):
    o = Orthanc(dir=tmp_path_factory.mktemp("orthanc-upstream"), pki=pki)
    try:
        o.start()
        yield o
    finally:
        o.stop()


@pytest.fixture
def proxy(pacs: Orthanc, pki):
    p = FaultProxy(pacs.https_port, pki.ca_cert, pki.client_cert, pki.client_key, pki.server_cert,
                   pki.server_key, port=free_port()).start()  # fmt: skip
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(autouse=True)
def figure(request: pytest.FixtureRequest):
    """Records each case's result (the call phase is reported before teardown) into the figures file."""
    failed_before = request.session.testsfailed
    yield
    name = request.node.name.removeprefix("test_")
    _results[name] = "failed" if request.session.testsfailed > failed_before else "passed"
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    figures = {
        "upstream_cases_run": len(_results),
        "upstream_cases_passed": sum(1 for r in _results.values() if r == "passed"),
        "upstream_instances_acknowledged": _counts["acknowledged"],
        "upstream_instances_delivered": _counts["delivered"],
        **{f"upstream_case_{k}": v for k, v in sorted(_results.items())},
    }
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")


# -- helpers -----------------------------------------------------------------------------------------


def study(tmp_path: Path, n: int, size: int = 64, seed: int = 7) -> list[data.Instance]:
    """A fresh study (its own UIDs) of `n` small CT slices."""
    return data.generate_ct_study(tmp_path / f"study-{seed}", slices=n, size=size, seed=seed).instances


def gateway(make_gateway, pacs: Orthanc, proxy: FaultProxy, name: str, **uplink) -> Gateway:
    gw = make_gateway(pacs, name=name, extra_uplink={**UPLINK, **uplink})
    gw.stow_url = proxy.url
    gw.write_config()
    return gw


def store(gw: Gateway, instances: list[data.Instance], tmp_path: Path) -> None:
    """Every C-STORE must succeed whatever the upstream does."""
    send.storescu(gw.port, instances, tmp_path / f"scu-{time.monotonic_ns()}", called_ae=gw.ae_title)
    _counts["acknowledged"] += len(instances)


def held(pacs: Orthanc) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand").json()}


def uids(instances: list[data.Instance]) -> set[str]:
    return {i.sop_instance_uid for i in instances}


def wait_delivered(gw: Gateway, pacs: Orthanc, instances: list[data.Instance], timeout: float = 60) -> dict:
    """Nothing lost: every instance is in Orthanc and counted sent; returns the final status."""
    want = uids(instances)
    wait_until(lambda: want <= held(pacs), timeout, f"all {len(want)} instances in Orthanc", interval=0.5)
    status = wait_until(lambda: (s := gw.status())["sent"] == len(want) and s, 30, "all counted sent")
    assert status["queued"] == status["uploading"] == status["failed"] == status["lost"] == 0, status
    _counts["delivered"] += len(want)
    return status


def preload(gw: Gateway, proxy: FaultProxy, instances: list[data.Instance], tmp_path: Path) -> dict:
    """Queues `instances` before the case starts, so that they go out as one batch: the PACS refuses the
    first upload with 401, which pauses the uplink (releasing the rows, no attempt counted) while the rest
    arrive; then the daemon stops. The next start clears the pause and finds them all due. Returns the
    status at the stop (its last_error is the 401's)."""
    proxy.use_http(lambda req, forward: Response(401, {"Content-Type": "text/plain"}, b"no"))
    gw.start()
    store(gw, instances, tmp_path)
    s = status_where(gw, lambda s: s["paused_until"] and waiting(s, len(instances)), 30, "the preload")
    gw.stop_ok()
    proxy.events.clear()
    return s


def status_where(gw: Gateway, pred, timeout: float, what: str) -> dict:
    return wait_until(lambda: (s := gw.status()) and pred(s) and s, timeout, what, interval=0.2)


def waiting(s: dict, n: int) -> bool:
    return s["queued"] + s["uploading"] == n and s["sent"] == s["failed"] == s["lost"] == 0


def log_text(gw: Gateway) -> str:
    return gw.log_path.read_text(errors="replace")


_LOG_LINE = re.compile(r"^\[(\S+Z) (\w+)\s+[^\]]*\] (.*)$")


def log_lines(gw: Gateway, level: str, contains: str) -> list[tuple[float, str]]:
    """(unix time, message) of the daemon's log lines at `level` containing `contains`, in its last run."""
    out = []
    for line in log_text(gw).split("===== start #")[-1].splitlines():
        m = _LOG_LINE.match(line)
        if m and m.group(2) == level and contains in m.group(3):
            t = dt.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            out.append((t, m.group(3)))
    return out


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def assert_quiet(proxy: FaultProxy, kind: str, count: int, secs: float, why: str) -> None:
    """For `secs` (longer than any backoff), no further `kind` event reaches the proxy."""
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        assert len(proxy.of_kind(kind)) == count, f"{why}: {len(proxy.of_kind(kind))} {kind} events, expected {count}"
        time.sleep(0.2)


# -- TCP-level cases ---------------------------------------------------------------------------------


def test_connection_refused_is_retried_with_backoff(make_gateway, pacs, proxy, tmp_path) -> None:
    gw = gateway(make_gateway, pacs, proxy, "refused")
    few = study(tmp_path, 3, seed=11)
    preload(gw, proxy, few, tmp_path)
    proxy.refuse()
    gw.start()

    # The uplink: attempt after attempt, each further apart (base 1 s, doubling, capped at 3 s).
    retried = wait_until(lambda: len(r := log_lines(gw, "WARN", "will be retried")) >= 4 and r, 40,
                         "four failed attempts")  # fmt: skip
    g = gaps([t for t, _ in retried])
    assert all(x >= 0.6 * RETRY_BASE for x in g), f"retried in a tight loop: gaps {g}"
    assert g[-1] >= 2 * RETRY_BASE * 0.8 and g[-1] > g[0] * 1.2, f"no backoff: gaps {g}"
    assert all(x <= RETRY_MAX * 1.2 + 1.5 for x in g), f"backoff above retry_max_secs: gaps {g}"
    # The operator: a last_error that names the refused connection, no pause, everything queued.
    s = gw.status()
    assert s["last_error"] and "refused" in s["last_error"].lower(), s
    assert s["paused_until"] is None and waiting(s, len(few)), s
    assert "refused" in retried[-1][1].lower(), retried[-1]
    assert not proxy.of_kind("connect")

    proxy.use_tcp()
    proxy.listen()  # the PACS is reachable again
    wait_delivered(gw, pacs, few)
    gw.stop_ok()


def test_reset_mid_request_is_retried_with_backoff(make_gateway, pacs, proxy, tmp_path) -> None:
    gw = gateway(make_gateway, pacs, proxy, "reset")
    few = study(tmp_path, 5, size=128, seed=12)  # ~32 KB each: the reset falls inside the body
    preload(gw, proxy, few, tmp_path)
    proxy.use_tcp(("reset", 40_000), ("reset", 40_000))
    gw.start()

    wait_delivered(gw, pacs, few)
    resets = proxy.of_kind("reset")
    assert len(resets) == 2 and all(r.detail["after"] == 40_000 for r in resets), resets
    connects = [e.t for e in proxy.of_kind("connect")]
    assert len(connects) == 3, f"{len(connects)} connections: expected 2 reset + 1 good"
    g = gaps(connects)
    assert all(x >= 0.7 * RETRY_BASE for x in g) and g[1] > g[0], f"no backoff between attempts: {g}"
    warned = log_lines(gw, "WARN", "will be retried")
    assert len(warned) == 2, warned
    assert all("reset" in m.lower() or "connection" in m.lower() for _, m in warned), warned
    s = gw.status()
    assert s["last_error"] and s["paused_until"] is None, s
    gw.stop_ok()


def test_stall_with_no_bytes_hits_the_idle_timeout_then_retries(make_gateway, pacs, proxy, tmp_path) -> None:
    # First connection: not one byte back (not even the TLS ServerHello). Second: stalls both ways after
    # 40 KB of the request. Third: passes. The study (~6 MB) is larger than what the daemon's buffers
    # and the kernel's (tcp_wmem up to 4 MB) can absorb, so the body is still being sent when it stalls.
    gw = gateway(make_gateway, pacs, proxy, "stall")
    few = study(tmp_path, 12, size=512, seed=13)
    preload(gw, proxy, few, tmp_path)
    proxy.use_tcp(("stall", 0), ("stall", 40_000))
    gw.start()

    s = status_where(gw, lambda s: s["last_error"] and "idle_timeout_secs" in s["last_error"], 30,
                     "status to show the idle timeout")  # fmt: skip
    assert s["paused_until"] is None and s["sent"] == 0 and s["lost"] == 0, s
    wait_delivered(gw, pacs, few, timeout=60)
    stalls = proxy.of_kind("stall")
    assert [e.detail["after"] for e in stalls] == [0, 40_000], stalls
    connects = [e.t for e in proxy.of_kind("connect")]
    assert len(connects) == 3, f"{len(connects)} connections, expected 3"
    for g in gaps(connects):
        # The idle timeout, then a backoff: never sooner, and never the minutes a hung request would take.
        assert IDLE <= g <= IDLE + RETRY_MAX * 1.2 + 6, f"gap {g:.1f} s between attempts"
    warned = log_lines(gw, "WARN", "idle_timeout_secs")
    assert len(warned) == 2 and "will be retried" in warned[0][1], warned
    gw.stop_ok()


def test_trickle_upload_completes_without_a_whole_request_timeout(make_gateway, pacs, proxy, tmp_path) -> None:
    rate = 16 * 1024  # bytes/s: ~10 s for the study, several times idle_timeout_secs, each second moving
    gw = gateway(make_gateway, pacs, proxy, "trickle")
    few = study(tmp_path, 2, size=200, seed=14)  # ~80 KB each
    size = sum(i.path.stat().st_size for i in few)
    before = preload(gw, proxy, few, tmp_path)
    proxy.use_tcp(("trickle", rate))
    gw.start()

    s = wait_delivered(gw, pacs, few, timeout=90)
    assert s["last_error_at"] == before["last_error_at"], f"a slow but moving upload was treated as a failure: {s}"
    assert len(proxy.streams) == 1, f"{len(proxy.streams)} connections: the upload was retried"
    up = proxy.streams[0]
    assert up["bytes_up"] >= size and up["last"] - up["first"] >= 2 * IDLE, up
    assert not log_lines(gw, "WARN", "will be retried")
    delivered = log_lines(gw, "INFO", "Delivered batch")
    assert len(delivered) == 1 and "instances=2" in delivered[0][1], delivered
    gw.stop_ok()


# -- HTTP-level cases --------------------------------------------------------------------------------


def test_500_is_retried_and_503_retry_after_is_honoured(make_gateway, pacs, proxy, tmp_path) -> None:
    retry_after = 5  # above the backoff of the second retry (2 s ±20%), within retry_max_secs

    def handler(req, forward):
        n = len(proxy.requests())
        if n == 0:
            return Response(500, {"Content-Type": "text/plain"}, b"database is locked")
        if n == 1:
            return Response(503, {"Content-Type": "text/plain", "Retry-After": str(retry_after)}, b"maintenance")
        return forward()

    gw = gateway(make_gateway, pacs, proxy, "http5xx", retry_max_secs=retry_after + 1)
    few = study(tmp_path, 3, seed=15)
    preload(gw, proxy, few, tmp_path)
    proxy.use_http(handler)
    gw.start()

    s = status_where(gw, lambda s: "HTTP 503" in (s["last_error"] or ""), 30, "status to show the 503")
    assert s["paused_until"] is None and waiting(s, len(few)), s
    wait_delivered(gw, pacs, few)
    reqs = proxy.requests()
    assert [r.detail["status"] for r in reqs] == [500, 503, 200], reqs
    assert all(set(r.detail["uids"]) == uids(few) for r in reqs), "each attempt carries the whole batch"
    after_500 = reqs[1].detail["started"] - reqs[0].detail["ended"]
    after_503 = reqs[2].detail["started"] - reqs[1].detail["ended"]
    assert 0.7 * RETRY_BASE <= after_500 < retry_after - 1, f"retry after the 500 came {after_500:.1f} s later"
    assert after_503 >= retry_after - 0.1, f"Retry-After: {retry_after} not honoured ({after_503:.1f} s)"
    warned = log_lines(gw, "WARN", "will be retried")
    assert any("HTTP 500" in m for _, m in warned) and any("HTTP 503" in m for _, m in warned), warned
    gw.stop_ok()


# What the pause's message must name for each refusal that only the operator can fix.
OPERATOR_FIX = {401: "uplink.password", 403: "uplink.password", 411: "request buffering", 200: "uplink.stow_url"}


@pytest.mark.parametrize("code", sorted(OPERATOR_FIX))
def test_a_refusal_only_the_operator_can_fix_pauses_the_uplink_without_a_loop(
    make_gateway, pacs, proxy, tmp_path, code
) -> None:
    """Wrong credentials (401, 403), a front end that refuses chunked request bodies (411), or a stow_url that
    answers 200 with something that is not a STOW-RS response and has never stored anything (200)."""
    proxy.use_http(lambda req, forward: Response(code, {"Content-Type": "text/plain",
                                                       "WWW-Authenticate": 'Basic realm="pacs"'}, b"no"))  # fmt: skip
    gw = gateway(make_gateway, pacs, proxy, f"auth{code}")
    gw.start()
    few = study(tmp_path, 3, seed=16 + code)
    store(gw, few, tmp_path)

    s = status_where(gw, lambda s: s["paused_until"], 30, f"the uplink to pause on {code}")
    assert f"HTTP {code}" in s["last_error"] and OPERATOR_FIX[code] in s["last_error"], s
    assert s["paused_until"] > time.time() + 60, s
    assert waiting(s, len(few)), s
    paused = log_lines(gw, "ERROR", "Paused the uplink")
    assert len(paused) == 1 and f"HTTP {code}" in paused[0][1], paused
    # No tight loop: one request, then nothing for well over retry_max_secs.
    assert_quiet(proxy, "request", 1, 2 * RETRY_MAX + 1, "requests while paused")
    assert gw.status()["paused_until"], "the pause ended early"
    gw.stop_ok()

    # The operator fixes the cause and restarts: everything that waited is delivered.
    proxy.use_http(None)
    gw.start()
    s = wait_delivered(gw, pacs, few)
    assert s["paused_until"] is None, s
    gw.stop_ok()


@pytest.mark.parametrize("which", ["expired", "other_ca"])
def test_wrong_or_expired_server_certificate_is_refused_and_never_sent(
    make_gateway, pacs, proxy, pki, tmp_path, which
) -> None:
    cert = expired_server_cert(pki, tmp_path / "certs") if which == "expired" else (
        pki.other_server_cert, pki.other_server_key)  # fmt: skip
    proxy.use_http(None, cert=cert)
    gw = gateway(make_gateway, pacs, proxy, f"cert-{which}")
    gw.start()
    few = study(tmp_path, 3, seed=20 + len(which))
    store(gw, few, tmp_path)

    s = status_where(gw, lambda s: s["paused_until"], 30, "the uplink to pause on the certificate")
    err = s["last_error"].lower()
    assert "certificate" in err, s
    if which == "expired":
        # Renewal is the PACS operator's job, unless the box's clock is what is wrong: the message says both,
        # with the clock's reading, and does not send the operator to uplink.ca_file.
        assert "expired" in err and "renew" in err and "ntp" in err and "clock reads" in err, s
        assert "uplink.ca_file" not in s["last_error"], s
    else:
        assert "uplink.ca_file" in s["last_error"] and ("unknown" in err or "issuer" in err), s
    assert waiting(s, len(few)), s
    assert proxy.of_kind("tls_error"), "the daemon never tried to connect"
    assert_quiet(proxy, "tls_error", len(proxy.of_kind("tls_error")), RETRY_MAX + 1, "handshakes while paused")
    assert not proxy.requests(), "a request went out over a refused certificate"
    assert not uids(few) & held(pacs)
    gw.stop_ok()

    proxy.use_http(None, cert=(pki.server_cert, pki.server_key))  # the PACS shows its real certificate
    gw.start()
    wait_delivered(gw, pacs, few)
    gw.stop_ok()


def test_202_with_failed_instances_retries_or_fails_only_those(make_gateway, pacs, proxy, tmp_path) -> None:
    few = study(tmp_path, 4, seed=30)
    busy, refused = few[0].sop_instance_uid, few[1].sop_instance_uid

    def handler(req, forward):
        resp = forward()
        if not proxy.requests():
            return fail_instances(resp, {busy: 0xA700, refused: 0xC000}, status=202)
        return resp

    gw = gateway(make_gateway, pacs, proxy, "partial")
    preload(gw, proxy, few, tmp_path)
    proxy.use_http(handler)
    gw.start()

    s = status_where(gw, lambda s: s["sent"] == 3 and s["failed"] == 1, 30, "3 sent and 1 failed")
    assert s["queued"] == s["uploading"] == s["lost"] == 0, s
    assert s["last_error"], s
    reqs = proxy.requests()
    assert len(reqs) == 2 and set(reqs[0].detail["uids"]) == uids(few), reqs
    assert reqs[1].detail["uids"] == [busy], f"only the out-of-resources instance is retried: {reqs[1]}"
    failed = log_lines(gw, "ERROR", "refused an instance for good")
    assert len(failed) == 1 and refused in failed[0][1] and "requeue" in failed[0][1], failed
    assert_quiet(proxy, "request", 2, RETRY_MAX + 1, "requests after the outcome")

    cp = gw.cli("requeue", "--config", str(gw.config_path), "--sop-instance-uid", refused)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    wait_delivered(gw, pacs, few)
    assert [r.detail["uids"] for r in proxy.requests()[2:]] == [[refused]]
    gw.stop_ok()


def test_409_fails_visibly_and_requeue_delivers(make_gateway, pacs, proxy, tmp_path) -> None:
    few = study(tmp_path, 3, seed=31)

    def handler(req, forward):
        if not proxy.requests():
            conflict = Response(200, {}, b"{}")
            return fail_instances(conflict, {u: 0xC000 for u in req.uids}, status=409)
        return forward()

    gw = gateway(make_gateway, pacs, proxy, "conflict")
    preload(gw, proxy, few, tmp_path)
    proxy.use_http(handler)
    gw.start()

    s = status_where(gw, lambda s: s["failed"] == len(few), 30, "all failed")
    assert s["queued"] == s["uploading"] == s["sent"] == s["lost"] == 0 and s["last_error"], s
    assert s["paused_until"] is None, s
    assert len(log_lines(gw, "ERROR", "refused an instance for good")) == len(few)
    assert_quiet(proxy, "request", 1, RETRY_MAX + 1, "a failed instance is not retried")
    assert not uids(few) & held(pacs)

    cp = gw.cli("requeue", "--config", str(gw.config_path))
    assert cp.returncode == 0 and str(len(few)) in cp.stdout, cp.stdout + cp.stderr
    wait_delivered(gw, pacs, few)
    assert len(proxy.requests()) == 2
    gw.stop_ok()


@pytest.mark.parametrize("when", ["after_the_body", "while_sending"])
def test_413_splits_the_batch(make_gateway, pacs, proxy, tmp_path, when) -> None:
    """The PACS takes at most 2 instances per request. It answers 413 either after reading the whole
    body, or (like nginx's client_max_body_size) as soon as the body grows too large, while the daemon
    is still sending, and then closes the connection."""
    limit = 2
    few = study(tmp_path, 5, size=128, seed=32 + len(when))  # ~33 KB each

    def handler(req, forward):
        if len(req.uids) > limit:
            return Response(413, {"Content-Type": "text/html"}, b"<html>413 Request Entity Too Large</html>")
        return forward()

    gw = gateway(make_gateway, pacs, proxy, f"split-{when}")
    preload(gw, proxy, few, tmp_path)
    proxy.use_http(handler)
    if when == "while_sending":
        proxy.max_body = limit * max(i.path.stat().st_size for i in few) + 2048
    gw.start()

    s = wait_delivered(gw, pacs, few)
    reqs = [(r.detail["status"], r.detail["uids"]) for r in proxy.requests()]
    too_large = sum(1 for st, _ in reqs if st == 413)
    if when == "after_the_body":
        assert reqs[0] == (413, [i.sop_instance_uid for i in few]), reqs
        assert all(st == 413 for st, u in reqs if len(u) > limit), reqs
    else:
        assert reqs[0][0] == 413 and all(r.detail.get("early") for r in proxy.requests() if r.detail["status"] == 413)
    assert too_large == 2, f"5 instances at 2 per request: 5 -> 3 + 2 -> (2 + 1) + 2: {reqs}"
    stored = [uid for st, u in reqs if st == 200 for uid in u]
    assert sorted(stored) == sorted(uids(few)), f"each instance stored exactly once: {reqs}"
    assert len(reqs) == 5, f"requests other than halving needs: {reqs}"
    assert len(log_lines(gw, "INFO", "two halves")) == too_large
    assert not log_lines(gw, "WARN", "will be retried"), "a split is not a failed attempt"
    assert s["failed"] == 0, s
    gw.stop_ok()


def test_200_omitting_an_instance_is_not_confirmed_and_retried(make_gateway, pacs, proxy, tmp_path) -> None:
    few = study(tmp_path, 3, seed=33)
    omitted = few[2].sop_instance_uid

    def handler(req, forward):
        resp = forward()
        return omit_instances(resp, {omitted}) if not proxy.requests() else resp

    gw = gateway(make_gateway, pacs, proxy, "omit")
    preload(gw, proxy, few, tmp_path)
    proxy.use_http(handler)
    gw.start()

    s = wait_delivered(gw, pacs, few)
    assert "not confirmed" in (s["last_error"] or ""), s
    reqs = proxy.requests()
    assert len(reqs) == 2 and reqs[1].detail["uids"] == [omitted], reqs
    warned = log_lines(gw, "WARN", "will be retried")
    assert len(warned) == 1 and "instances=1" in warned[0][1] and "ReferencedSOPSequence" in warned[0][1], warned
    gw.stop_ok()
