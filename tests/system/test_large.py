"""Bounded memory: a 256 MiB instance goes through the gateway, byte-identical, while the daemon's peak
resident memory stays far below the instance's size (it streams; it never holds a whole instance)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from harness import send
from harness.checks import wait_for_instances
from harness.data import generate_large_instance
from harness.part10 import dataset_bytes, file_dataset_bytes
from harness.util import wait_until


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_large_instance_is_streamed_with_bounded_memory(orthanc, make_gateway, tmp_path: Path) -> None:
    big = generate_large_instance(tmp_path / "big.dcm")
    size_mib = big.path.stat().st_size / 2**20
    assert size_mib >= 256
    gw = make_gateway(orthanc)
    gw.start()
    assert gw.proc is not None
    pid = gw.proc.pid

    send.pynetdicom_send(gw.port, [big], called_ae=gw.ae_title)  # straight from the file, not re-encoded
    wait_for_instances(orthanc, 1, timeout=300, what="the large instance")
    wait_until(lambda: gw.status()["sent"] == 1, 60, "the large instance to be confirmed")

    peak = _peak_rss_mib(pid)
    assert peak < size_mib / 2, f"passerelled peaked at {peak:.0f} MiB RSS for a {size_mib:.0f} MiB instance"

    (iid,) = orthanc.instance_ids()
    with orthanc.session() as s:
        r = s.get(f"{orthanc.base_url}/instances/{iid}/file", timeout=300)
        r.raise_for_status()
    got = hashlib.sha256(dataset_bytes(r.content)).hexdigest()
    want = hashlib.sha256(file_dataset_bytes(big.path)).hexdigest()
    assert got == want, "the large instance's dataset differs from what was sent"
    print(f"Large instance: {size_mib:.0f} MiB, passerelled peak RSS {peak:.0f} MiB")
    gw.stop_ok()
