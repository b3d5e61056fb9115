"""The daemon under systemd: it says READY=1 once it serves, feeds the watchdog while it is healthy, and
says STOPPING=1 on SIGTERM. The test plays systemd's part with its own notification socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def _collect(sock: socket.socket, until, timeout: float) -> list[str]:
    """Reads sd_notify datagrams until `until(messages)` holds or the deadline passes."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            break
        got.extend(line for line in data.decode(errors="replace").splitlines() if line)
    return got


def test_readiness_watchdog_and_stopping_are_reported_to_systemd(orthanc, make_gateway, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        gw = make_gateway(orthanc)
        # 1 s watchdog: systemd expects a ping at least every second, the daemon pings every half.
        gw.env.update(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")
        gw.start()

        got = _collect(sock, lambda m: "READY=1" in m and m.count("WATCHDOG=1") >= 3, timeout=20)
        assert "READY=1" in got, f"no READY=1 from the daemon: {got}\n{gw.log_excerpt()}"
        assert got.count("WATCHDOG=1") >= 3, f"the watchdog is not fed: {got}"

        gw.stop_ok()
        after = _collect(sock, lambda m: "STOPPING=1" in m, timeout=5)
        assert "STOPPING=1" in after, f"no STOPPING=1 on SIGTERM: {after}"
    finally:
        sock.close()
