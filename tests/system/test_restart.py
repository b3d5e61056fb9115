"""2. Stopping passerelled mid-queue and starting it again resumes; a crash after the acknowledgement
loses nothing (the C-STORE success went out only after the instance was durable)."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.util import wait_until


def _unconfirmed(status: dict) -> int:
    return status["queued"] + status["uploading"]


def test_sigterm_mid_queue_then_restart_resumes(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    study = ct_study.instances
    n = len(study)
    expected = {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study}
    gw = make_gateway(orthanc, extra_uplink={"batch_max_instances": 10})

    # The regional network's front door is down: connections are refused.
    orthanc.stop_front()
    gw.start()
    send.storescu(gw.port, study, tmp_path / "scu", called_ae=gw.ae_title)  # every C-STORE acknowledged
    status = gw.status()
    assert _unconfirmed(status) == n and status["sent"] == 0, status
    assert status["oldest_queued_age_secs"] is not None, status

    # SIGTERM with the whole study queued: clean exit, and the queue is still there after a restart.
    gw.stop_ok()
    status = gw.status()
    assert status["queued"] == n and status["uploading"] == 0 and status["lost"] == 0, status
    gw.start()

    # Upstream comes back; stop the daemon again as soon as the first instances have arrived.
    orthanc.start_front()
    wait_for_instances(orthanc, 1, timeout=60, what="the first upload after the outage")
    gw.stop_ok()
    status = gw.status()
    assert status["uploading"] == 0 and status["lost"] == 0 and status["failed"] == 0, status
    assert status["queued"] + status["sent"] == n, status

    gw.start()
    wait_for_instances(orthanc, n, timeout=180, what="the rest of the study after the restart")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert status["lost"] == 0 and status["failed"] == 0 and _unconfirmed(status) == 0, status
    assert_byte_identical(orthanc, expected)
    gw.stop_ok()


def test_sigkill_right_after_acknowledgement_loses_nothing(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    study = ct_study.instances[:60]
    n = len(study)
    gw = make_gateway(orthanc, extra_uplink={"batch_max_instances": 5})

    orthanc.stop_orthanc()  # the front door answers 502 Bad Gateway
    gw.start()
    send.storescu(gw.port, study, tmp_path / "scu", called_ae=gw.ae_title)
    gw.kill()  # no chance to flush anything after the last acknowledgement

    status = gw.status()
    assert status["lost"] == 0, status
    assert status["queued"] + status["uploading"] == n, status

    orthanc.start_orthanc()
    gw.start()
    wait_for_instances(orthanc, n, timeout=120, what="the study acknowledged before the crash")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert status["lost"] == 0 and status["failed"] == 0 and status["queued"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    gw.stop_ok()


def test_sigkill_during_upload_resumes(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    study = ct_study.instances
    n = len(study)
    gw = make_gateway(orthanc, extra_uplink={"batch_max_instances": 5})
    orthanc.stop_front()
    gw.start()
    send.storescu(gw.port, study, tmp_path / "scu", called_ae=gw.ae_title)
    orthanc.start_front()
    wait_for_instances(orthanc, 1, timeout=60, what="uploads to start")
    gw.kill()  # rows left 'uploading' must go back to 'queued' at the next start

    gw.start()
    wait_for_instances(orthanc, n, timeout=180, what="the study after the crash")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert status["lost"] == 0 and status["failed"] == 0 and status["queued"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    gw.stop_ok()


def test_sigterm_during_start_up_waits_for_it_and_exits_cleanly(orthanc, make_gateway, tmp_path: Path) -> None:
    """systemd may stop the daemon while it is still opening its spool (recovery of a large queue takes
    seconds). The SIGTERM must not kill it half-way (exit by signal, what systemd logs as a failure): the
    start-up ends, then the daemon stops as after any SIGTERM, exit code 0. The test holds the spool
    database's write lock so that the start-up cannot end before the signal is sent."""
    gw = make_gateway(orthanc)
    gw.start()
    gw.stop_ok()
    db = sqlite3.connect(gw.spool_dir / "spool.db", isolation_level=None, timeout=30)
    try:
        db.execute("BEGIN EXCLUSIVE")
        gw.start(wait_ready=False)
        assert gw.proc is not None
        spool_db = str(gw.spool_dir / "spool.db")
        wait_until(lambda: spool_db in _open_files(gw.proc.pid), 30, "passerelled to open spool.db")
        started = gw.log_path.read_text(errors="replace").split("===== start #")[-1]
        assert "Passerelle is ready" not in started, "the start-up ended while the test held the write lock"
        gw.proc.send_signal(signal.SIGTERM)
    finally:
        db.execute("COMMIT")
        db.close()
    gw.stop_ok()
    last_run = gw.log_path.read_text(errors="replace").split("===== start #")[-1]
    assert "Passerelle is ready" in last_run and "Passerelle stopped cleanly" in last_run, last_run[-3000:]


def test_a_second_daemon_on_the_same_spool_refuses_to_start_and_the_first_goes_on(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    """Two daemons on one spool (a copied config with another port, a unit started twice) would empty each
    other's pre-created files and re-queue each other's uploads. The second one exits non-zero with an ERROR
    that names the spool and the fix; the first one keeps receiving and forwarding."""
    first = make_gateway(orthanc)
    first.start()
    second = make_gateway(orthanc, name="second")
    second.write_config()
    text = second.config_path.read_text()
    second.config_path.write_text(text.replace(str(second.spool_dir), str(first.spool_dir)))
    second.start(wait_ready=False)
    assert second.proc is not None
    code = second.proc.wait(timeout=60)
    log = second.log_path.read_text(errors="replace")
    assert code != 0, log[-3000:]
    assert f"Another passerelled already runs on the spool {first.spool_dir}" in log, log[-3000:]
    assert "Passerelle is ready" not in log, log[-3000:]

    study = ct_study.instances[:5]
    send.storescu(first.port, study, tmp_path / "scu", called_ae=first.ae_title)
    wait_for_instances(orthanc, len(study), timeout=120, what="the first daemon's deliveries")
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    first.stop_ok()


def _open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    out = set()
    for fd in fds.iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile
    return out
