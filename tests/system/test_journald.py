"""Logging to journald, as systemd runs the daemon: stderr is the journal stream (`JOURNAL_STREAM` names its
device and inode), and the daemon sends structured records to journald's native socket,
`/run/systemd/journal/socket`, with `SYSLOG_IDENTIFIER=passerelled` and a syslog priority per level.

No journald runs on the test machines, so the test plays journald: it binds a datagram socket in a directory
of its own, and starts the daemon in a private mount namespace (`unshare --mount`) where that directory is
mounted on `/run/systemd/journal`. The host's `/run` is never touched. It then parses the journal's native
protocol (`FIELD=value` lines, or `FIELD`, a little-endian u64 length and the bytes, for values holding a
newline) and checks the records."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from harness.gateway import passerelled_bin
from harness.send import echoscu

# Mounted in the daemon's own mount namespace: a tmpfs on /run (so the host's /run is unchanged whatever
# exists there), then the test's socket directory on /run/systemd/journal.
NAMESPACE_SCRIPT = (
    "set -e; mount --make-rprivate /; mount -t tmpfs -o mode=0755 tmpfs /run; "
    'mkdir -p /run/systemd/journal; mount --bind "$1" /run/systemd/journal; shift; exec "$@"'
)


def parse_native(datagram: bytes) -> dict[str, str]:
    """One record of journald's native protocol (systemd's JOURNAL_NATIVE_PROTOCOL)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        eol = datagram.find(b"\n", i)
        if eol < 0:
            raise AssertionError(f"unterminated field at byte {i}: {datagram[i:i + 80]!r}")
        line = datagram[i:eol]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = eol + 1
        else:
            key = line
            (length,) = struct.unpack_from("<Q", datagram, eol + 1)
            start = eol + 1 + 8
            value = datagram[start : start + length]
            if datagram[start + length : start + length + 1] != b"\n":
                raise AssertionError(f"binary field {key!r} is not followed by a newline")
            i = start + length + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


class Journal:
    """The test's stand-in for journald: a datagram socket collecting native records."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)  # the daemon drops root; it must reach the socket as its own user
        self.dir = directory
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(directory / "socket"))
        os.chmod(directory / "socket", 0o666)
        self.records: list[dict[str, str]] = []

    def read_until(self, predicate, timeout: float) -> dict[str, str] | None:
        """Collects records until one satisfies `predicate`; returns it, or None at the deadline."""
        for r in self.records:
            if predicate(r):
                return r
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                return None
            if not data:
                continue  # the probe the logger sends when it starts
            record = parse_native(data)
            self.records.append(record)
            if predicate(record):
                return record
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give the daemon its own /run/systemd/journal")
    j = Journal(tmp_path / "journal")
    yield j
    j.close()


def test_the_daemon_logs_structured_records_to_journald_under_systemd(
    orthanc, make_gateway, journal: Journal, tmp_path: Path
) -> None:
    gw = make_gateway(orthanc, allowed_calling_ae_titles=["CT01"])
    config = gw.write_config()
    gw.prepare_for_daemon()  # the spool is the daemon user's, as gw.start() does
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "RUST_LOG")}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen(
            ["unshare", "--mount", "--", "sh", "-c", NAMESPACE_SCRIPT, "sh", str(journal.dir),
             str(passerelled_bin()), "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env,
        )
    try:
        ready = journal.read_until(lambda r: r.get("MESSAGE", "").startswith("Passerelle is ready"), timeout=30)
        assert ready is not None, (
            f"no 'Passerelle is ready' record reached the journal socket; records: {journal.records}\n"
            f"daemon exit code: {proc.poll()}; stderr:\n{stderr_path.read_text(errors='replace')[-3000:]}"
        )
        assert ready.get("SYSLOG_IDENTIFIER") == "passerelled", ready
        # systemd-journal-logger maps error/warn/info/debug/trace to syslog 3/4/5/6/7.
        assert ready.get("PRIORITY") == "5", f"an info record must have syslog priority 5 (notice): {ready}"
        assert ready.get("SYSLOG_PID") == str(proc.pid), f"the record is not from the daemon's pid: {ready}"
        assert f"listen=127.0.0.1:{gw.port}" in ready["MESSAGE"], ready

        # An operator-facing warning: a modality whose AE title is not allowed is turned away.
        refused = echoscu(gw.port, gw.ae_title, calling_ae="INTRUDER")
        assert refused.returncode != 0, f"INTRUDER was let in: {refused.stdout}{refused.stderr}"
        rejected = journal.read_until(lambda r: r.get("MESSAGE", "").startswith("Rejected association"), timeout=10)
        assert rejected is not None, f"no rejection record: {journal.records}"
        assert rejected.get("PRIORITY") == "4", f"a warning must have syslog priority 4: {rejected}"
        assert "calling_ae=INTRUDER" in rejected["MESSAGE"], rejected

        proc.terminate()
        assert proc.wait(timeout=30) == 0, stderr_path.read_text(errors="replace")[-3000:]
        stopped = journal.read_until(lambda r: "stop" in r.get("MESSAGE", "").lower(), timeout=5)
        assert stopped is not None, f"no record about stopping: {[r.get('MESSAGE') for r in journal.records]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    # Under journald every record goes to the socket; none of them is duplicated as text on stderr.
    text = stderr_path.read_text(errors="replace")
    assert "Passerelle is ready" not in text, f"records went to stderr instead of the journal:\n{text[-2000:]}"
