"""Hostile input on the DICOM port: random bytes, a truncated A-ASSOCIATE-RQ, a PDU announcing 0xFFFFFFFF
bytes, P-DATA before any association, wrong PDV lengths inside an established association, and 500 idle
connections (slowloris) kept open while a real modality stores. The daemon must stay up, answer each case
(A-ABORT or a closed connection), keep its memory bounded, and a legitimate modality (storescu) must store
during and after the abuse, every instance arriving in Orthanc.

Figures (cases survived, peak RSS) go to tests/.work/figures/abuse.json.
"""

from __future__ import annotations

import json
import random
import resource
import socket
import struct
import threading
import time
from pathlib import Path

from harness import data, send
from harness.checks import wait_for_instances
from harness.gateway import REPO
from harness.util import wait_until

FIGURES = REPO / "tests" / ".work" / "figures" / "abuse.json"
IDLE_CONNECTIONS = 500
ARTIM_SECS = 2
RSS_BOUND_MIB = 64
CALLING_AE = "ABUSER"

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"


# -- PDUs by hand (PS3.8 §9.3) -------------------------------------------------------------------------


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called_ae: str, calling_ae: str = CALLING_AE) -> bytes:
    pc = bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_LE.encode())
    pc3 = bytes([3, 0, 0, 0]) + _item(0x30, CT_IMAGE_STORAGE.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user = _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4.5.6")
    body = (
        struct.pack(">HH", 1, 0)
        + called_ae.encode().ljust(16)
        + calling_ae.encode().ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, pc)
        + _item(0x20, pc3)
        + _item(0x50, user)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdata(pdvs: list[tuple[int, int, bytes]], pdv_length: int | None = None) -> bytes:
    """A P-DATA-TF of (context id, control header, bytes) PDVs; `pdv_length` overrides the PDV length
    field of every PDV (a lie)."""
    body = b""
    for pc_id, control, value in pdvs:
        length = len(value) + 2 if pdv_length is None else pdv_length
        body += struct.pack(">IBB", length, pc_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def echo_command() -> bytes:
    """A C-ECHO-RQ command set, implicit VR little endian."""

    def el(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0x0000, elem, len(value)) + value

    rest = (
        el(0x0002, VERIFICATION.encode() + b"\0")
        + el(0x0100, struct.pack("<H", 0x0030))
        + el(0x0110, struct.pack("<H", 1))
        + el(0x0800, struct.pack("<H", 0x0101))
    )
    return el(0x0000, struct.pack("<I", len(rest))) + rest


# -- a raw peer ----------------------------------------------------------------------------------------


def connect(port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the daemon sends until it closes the connection; raises if it stays open `timeout` s."""
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the daemon kept the connection open for {timeout} s (received {got[:32]!r})")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got
        except socket.timeout:
            continue
        if not chunk:
            return got
        got += chunk


def send_all(s: socket.socket, payload: bytes) -> None:
    """Sends what the daemon lets us send: it may abort and close before reading everything."""
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass


def assert_aborted(reply: bytes, what: str) -> None:
    """The reply is nothing but an A-ABORT (or nothing: the connection was just closed)."""
    assert reply == b"" or (reply[0] == 0x07 and len(reply) == 10), f"{what}: unexpected reply {reply[:32]!r}"


def associate(port: int, called_ae: str) -> socket.socket:
    s = connect(port)
    s.sendall(associate_rq(called_ae))
    head = b""
    while len(head) < 6:
        chunk = s.recv(6 - len(head))
        assert chunk, "the daemon closed the connection instead of answering the A-ASSOCIATE-RQ"
        head += chunk
    assert head[0] == 0x02, f"expected an A-ASSOCIATE-AC, got PDU type {head[0]:#04x}"
    (length,) = struct.unpack(">I", head[2:6])
    left = length
    while left:
        left -= len(s.recv(left))
    return s


# -- the daemon's health ---------------------------------------------------------------------------------


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def raise_fd_limit(need: int) -> None:
    """The test process holds `need` sockets, and the daemon (which inherits this limit) as many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        assert hard == resource.RLIM_INFINITY or hard >= need, (
            f"ulimit -n is {soft} (hard {hard}); this test needs {need} file descriptors: raise the hard limit"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Slowloris:
    """Keeps `n` connections open, reopening each one the daemon closes. Every `greedy_every`-th one sends
    a header announcing a 64 KiB A-ASSOCIATE-RQ and 48 KiB of it, then stalls (it pins a buffer); the
    others never send a byte."""

    def __init__(self, port: int, n: int, greedy_every: int = 3) -> None:
        self.port, self.n, self.greedy_every = port, n, greedy_every
        self.opened = 0
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.opened % self.greedy_every == 0:
            send_all(s, struct.pack(">BBI", 0x01, 0, 65536) + b"\0" * 48 * 1024)
        self.opened += 1
        s.setblocking(False)
        return s

    def _closed_by_peer(self, s: socket.socket) -> bool:
        try:
            return s.recv(1024) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def start(self) -> None:
        self.socks = [self._open() for _ in range(self.n)]
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            for i, s in enumerate(self.socks):
                if self._closed_by_peer(s):
                    s.close()
                    self.socks[i] = self._open()
                    self.reopened += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for s in self.socks:
            s.close()


# -- the test --------------------------------------------------------------------------------------------


def test_hostile_peers_neither_crash_nor_bloat_the_daemon_and_modalities_still_store(
    orthanc, make_gateway, tmp_path: Path
) -> None:
    raise_fd_limit(4 * IDLE_CONNECTIONS)
    study = data.generate_ct_study(tmp_path / "ct", slices=12, size=64)
    during, after = study.instances[:6], study.instances[6:]
    gw = make_gateway(orthanc, extra_dicom={"artim_timeout_secs": ARTIM_SECS, "idle_timeout_secs": 10})
    gw.start()
    assert gw.proc is not None
    pid, port, ae = gw.proc.pid, gw.port, gw.ae_title
    rng = random.Random(20261127)
    results: dict[str, str] = {}
    peak_rss_kib = 0

    def healthy(case: str) -> None:
        nonlocal peak_rss_kib
        assert gw.running, f"passerelled died during {case}\n{gw.log_excerpt()}"
        peak_rss_kib = max(peak_rss_kib, vm_kib(pid, "VmRSS"))
        assert send.echoscu(port, ae).returncode == 0, f"no C-ECHO after {case}\n{gw.log_excerpt()}"

    def case(name: str, run) -> None:
        results[name] = "failed"
        run()
        healthy(name)
        results[name] = "passed"

    def random_bytes() -> None:
        for size in (1, 6, 7, 100, 4096, 65536, 300_000):
            s = connect(port)
            payload = bytes(rng.getrandbits(8) for _ in range(min(size, 4096))) * max(1, size // 4096)
            send_all(s, payload)
            assert_aborted(read_until_closed(s, ARTIM_SECS + 10), f"{size} random bytes")
            s.close()

    def truncated_associate_rq() -> None:
        rq = associate_rq(ae)
        for cut, close_write in ((10, True), (len(rq) // 2, True), (len(rq) - 1, False)):
            s = connect(port)
            s.sendall(rq[:cut])
            if close_write:
                s.shutdown(socket.SHUT_WR)
            # Closed at once (EOF inside the PDU) or after ARTIM (the rest never comes).
            assert_aborted(read_until_closed(s, ARTIM_SECS + 10), f"A-ASSOCIATE-RQ cut at {cut}")
            s.close()

    def pdu_length_ffffffff() -> None:
        for pdu_type in (0x01, 0x04, 0x05, 0x07):
            s = connect(port)
            send_all(s, struct.pack(">BBI", pdu_type, 0, 0xFFFFFFFF) + b"\0" * 1024)
            reply = read_until_closed(s, 10)
            assert reply[:1] == b"\x07", f"PDU type {pdu_type:#04x} of 0xFFFFFFFF bytes: got {reply[:16]!r}"
            s.close()
        s = associate(port, ae)
        send_all(s, struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF))
        assert read_until_closed(s, 10)[:1] == b"\x07", "a P-DATA of 0xFFFFFFFF bytes was not aborted"
        s.close()

    def pdata_before_association() -> None:
        s = connect(port)
        send_all(s, pdata([(1, 0x03, echo_command())]))
        assert read_until_closed(s, 10)[:1] == b"\x07", "P-DATA before association was not aborted"
        s.close()

    def wrong_pdv_lengths() -> None:
        cmd = echo_command()
        for lie in (0, 1, len(cmd) + 3, len(cmd) + 1000, 0xFFFFFFFF):
            s = associate(port, ae)
            send_all(s, pdata([(1, 0x03, cmd)], pdv_length=lie))
            assert read_until_closed(s, 10)[:1] == b"\x07", f"a PDV length of {lie} was not aborted"
            s.close()
        # Two PDVs whose lengths disagree with each other, and a PDV on a context never proposed.
        for pdu in (
            pdata([(1, 0x01, cmd[:10])], pdv_length=12) + pdata([(1, 0x03, cmd[10:])], pdv_length=2),
            pdata([(9, 0x03, cmd)]),
        ):
            s = associate(port, ae)
            send_all(s, pdu)
            assert read_until_closed(s, 10)[:1] == b"\x07", "an inconsistent PDV was not aborted"
            s.close()
        # Sanity: the same C-ECHO with honest lengths is answered.
        s = associate(port, ae)
        s.sendall(pdata([(1, 0x03, cmd)]))
        assert s.recv(6)[:1] == b"\x04", "an honest C-ECHO got no P-DATA answer"
        s.close()

    def pester(stop: threading.Event, errors: list[str]) -> None:
        """Bad PDUs on fresh connections, over and over, while a modality stores."""
        while not stop.is_set():
            try:
                pdu_length_ffffffff()
                pdata_before_association()
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(repr(e))
                return

    def slowloris_while_storing() -> None:
        loris = Slowloris(port, IDLE_CONNECTIONS)
        loris.start()
        stop, errors = threading.Event(), []
        pest = threading.Thread(target=pester, args=(stop, errors), daemon=True)
        try:
            # Hold them past ARTIM so the daemon closes some and they come back.
            wait_until(lambda: loris.reopened >= 50, ARTIM_SECS + 20, "the daemon to close idle connections")
            rss = vm_kib(pid, "VmRSS")
            pest.start()
            send.storescu(port, during, tmp_path / "during", called_ae=ae, timeout=120)
            stop.set()
            pest.join(timeout=30)
            assert not errors, f"bad PDUs sent during the store were not aborted: {errors}"
            assert gw.running
            nonlocal peak_rss_kib
            peak_rss_kib = max(peak_rss_kib, rss, vm_kib(pid, "VmRSS"))
        finally:
            stop.set()
            loris.close()

    try:
        for name, run in (
            ("random_bytes", random_bytes),
            ("truncated_associate_rq", truncated_associate_rq),
            ("pdu_length_0xffffffff", pdu_length_ffffffff),
            ("pdata_before_association", pdata_before_association),
            ("wrong_pdv_lengths", wrong_pdv_lengths),
            ("slowloris_500_idle_connections", slowloris_while_storing),
        ):
            case(name, run)
        send.storescu(port, after, tmp_path / "after", called_ae=ae, timeout=120)
        wait_for_instances(orthanc, len(study.instances), timeout=120, what="the CT stored during and after abuse")
        missing = {i.sop_instance_uid for i in study.instances} - orthanc.sop_instance_uids().keys()
        assert not missing, f"instances stored during/after abuse missing in Orthanc: {sorted(missing)}"
        peak_hwm_kib = vm_kib(pid, "VmHWM")
        peak_rss_kib = max(peak_rss_kib, peak_hwm_kib)
        assert peak_hwm_kib < RSS_BOUND_MIB * 1024, (
            f"passerelled peaked at {peak_hwm_kib / 1024:.1f} MiB RSS under abuse (bound {RSS_BOUND_MIB} MiB)"
        )
        gw.stop_ok()
    finally:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        figures = {f"abuse_case_{k}": v for k, v in results.items()}
        figures.update(
            abuse_cases_run=len(results),
            abuse_cases_passed=sum(1 for v in results.values() if v == "passed"),
            abuse_idle_connections=IDLE_CONNECTIONS,
            peak_rss_mib=round(peak_rss_kib / 1024, 1),
        )
        FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
