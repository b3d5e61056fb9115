"""Power cuts: passerelled runs in a QEMU VM with its spool on a virtual disk (`harness/vm.py`), and the
plug is pulled (SIGKILL of QEMU: the guest's page cache and everything in flight are lost) at random
moments while two pynetdicom modalities store and the uplink sends to Orthanc; the VM is booted again
after each cut, on the same disk.

After every reboot, what only holds if the fsyncs come in the right order under power loss:
- the daemon starts (ext4 replays its journal, the spool opens: no refusal for a damaged or missing
  index, no `lost` or `quarantined` row);
- every instance whose C-STORE was acknowledged before the cut has a row in the spool (`queued`,
  `uploading` or `sent`) or is already in Orthanc.

At the end: every acknowledged instance is in Orthanc (lost = 0), a sample is byte-identical after
group 0002, re-deliveries are counted (Orthanc's Lua hook, as in the kill -9 campaign), and after a
clean stop `e2fsck -fn` finds the spool's file system clean. Figures: `tests/.work/figures/power_cut.json`;
`POWER_CUT_ROUNDS` and `POWER_CUT_SEED` replay a run.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from harness import campaign
from harness.campaign import Modality
from harness.part10 import dataset_bytes, file_dataset_bytes
from harness.send import pynetdicom_send
from harness.util import free_port, wait_until
from harness.vm import VmGateway, vm_gateway_for

ROUNDS = int(os.environ.get("POWER_CUT_ROUNDS", "10"))
SEED = int(os.environ.get("POWER_CUT_SEED", str(int(time.time()))))
MODALITIES = 2
STUDIES_PER_MODALITY = 2
SLICES_PER_STUDY = 150
BYTE_CHECK_SAMPLE = 30
GOOD_STATES = {"queued", "uploading", "sent"}


@pytest.fixture
def vm_gateway(tmp_path: Path, pki):
    """Factory: vm_gateway(orthanc, **overrides) -> a configured (not started) VmGateway."""
    made: list[VmGateway] = []

    def factory(orthanc, name: str = "vm-gateway", **kw) -> VmGateway:
        g = vm_gateway_for(tmp_path / name, orthanc, pki, **kw)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.cleanup()
        print(g.log_excerpt(120))


def _ready_or_dead(gw: VmGateway) -> bool:
    if not gw.running:
        return True
    return gw.answers_echo()


def _boot(gw: VmGateway, r: int) -> float:
    """Boots after a cut; asserts the daemon came up (the spool opened). Returns seconds to C-ECHO."""
    t0 = time.monotonic()
    gw.start(wait_ready=False)
    wait_until(lambda: _ready_or_dead(gw), 90, f"boot {r}: passerelled in the VM to answer C-ECHO", interval=0.2)
    assert gw.running, (
        f"boot {r}: the VM stopped: passerelled exited with code {gw.daemon_exit_code()} after the power cut "
        f"(a spool it refuses to open?); QEMU exit code {gw.proc.returncode if gw.proc else None} (0 with nothing "
        f"on the console: the guest reset before /init, with -no-reboot)\n{gw.log_excerpt()}"
    )
    return time.monotonic() - t0


def _check_acknowledged_survived(gw: VmGateway, held: set[str], acked: set[str], r: int) -> dict[str, int]:
    """Every instance acknowledged before the cut has a good row in the spool or is in Orthanc (`held`,
    read after the reboot: an instance delivered before the cut is there)."""
    status = gw.status()
    assert status["lost"] == 0 and status["quarantined"] == 0, f"boot {r}: {status}\n{gw.log_excerpt()}"
    rows = gw.spool_rows()
    bad = {uid: states for uid, states in rows.items() if uid in acked and not states & GOOD_STATES}
    assert not bad, f"boot {r}: acknowledged instances with only bad rows after the cut: {list(bad.items())[:5]}"
    missing = sorted(uid for uid in acked if uid not in rows and uid not in held)
    assert not missing, (
        f"boot {r}: {len(missing)} instance(s) acknowledged before the power cut are neither in the spool nor "
        f"in Orthanc, e.g. {missing[:5]}\n{gw.log_excerpt()}"
    )
    return {"rows": len(rows), "acked_checked": len(acked)}


_OPENED = re.compile(
    r"Opened the spool\. .*temp_files_removed=(\d+) uploading_requeued=(\d+) lost=(\d+)"
    r" taken_in_from_precreated_files=(\d+)"
)


def test_power_cuts_lose_no_acknowledged_instance(orthanc_recording, vm_gateway, tmp_path: Path) -> None:
    started = time.monotonic()
    orthanc, received_log = orthanc_recording
    rng = random.Random(SEED)
    print(f"power-cut campaign seed: POWER_CUT_SEED={SEED}")

    instances = campaign.small_studies(tmp_path / "studies", MODALITIES * STUDIES_PER_MODALITY, SLICES_PER_STUDY)
    by_uid = {i.sop_instance_uid: i for i in instances}
    share = len(instances) // MODALITIES
    gw = vm_gateway(
        orthanc,
        extra_dicom={"max_pdu_length": 4096},  # several PDVs per instance: cuts land mid-instance too
        extra_uplink={"batch_max_instances": 10, "retry_base_secs": 1, "retry_max_secs": 2},
    )
    boot_secs = [_boot(gw, 0)]
    modalities = [
        Modality(
            port=gw.port,
            called_ae=gw.ae_title,
            calling_ae=f"MODALITY{k + 1}",
            instances=instances[k * share : (k + 1) * share],
            per_association=3,
            pace_secs=0.1,
        )
        for k in range(MODALITIES)
    ]
    cut_after: list[float] = []
    acked_at_cut: list[int] = []
    checked: list[dict[str, int]] = []
    try:
        for m in modalities:
            m.start()
        for r in range(1, ROUNDS + 1):
            # The cut must fall while instances flow: wait for this boot's first acknowledgement (a
            # modality may still be inside an association attempt that QEMU accepted while the guest booted).
            n0 = sum(len(m.acked) for m in modalities)
            wait_until(lambda: sum(len(m.acked) for m in modalities) > n0, 60,
                       f"round {r}: the modalities to store again after the reboot", interval=0.05)
            delay = rng.uniform(0.0, 2.5)
            time.sleep(delay)  # the experiment: the plug is pulled at a random moment
            assert gw.running, f"round {r}: the VM stopped before the cut\n{gw.log_excerpt()}"
            gw.kill()
            acked = set().union(*(m.acked for m in modalities))
            cut_after.append(round(delay, 2))
            acked_at_cut.append(len(acked))
            boot_secs.append(_boot(gw, r))
            checked.append(_check_acknowledged_survived(gw, campaign.orthanc_uids(orthanc), acked, r))
    finally:
        for m in modalities:
            m.stop()
        for m in modalities:
            m.join(timeout=60)
    rounds_done = time.monotonic()
    for m in modalities:
        assert m.error is None, f"{m.name} failed: {m.error!r}"
        assert not m.is_alive(), f"{m.name} did not stop"
    acked = set().union(*(m.acked for m in modalities))
    assert len(acked) > 2 * ROUNDS, f"only {len(acked)} instances acknowledged during {ROUNDS} power cuts"

    status = wait_until(
        lambda: (s := gw.status())["queued"] + s["uploading"] == 0 and s,
        120,
        "the queue to drain after the power cuts",
        interval=0.5,
    )
    drained = time.monotonic()
    held = campaign.orthanc_uids(orthanc)
    lost = sorted(acked - held)
    received = campaign.received_counts(received_log)
    redelivered = {uid: n - 1 for uid, n in received.items() if n > 1}
    log_text = gw.log_path.read_text(errors="replace")
    opened = [tuple(map(int, m)) for m in _OPENED.findall(log_text)]

    sample = rng.sample(sorted(acked & held), min(BYTE_CHECK_SAMPLE, len(acked & held)))
    ids = {r["MainDicomTags"]["SOPInstanceUID"]: r["ID"] for r in orthanc.get("/instances", params={"expand": ""}).json()}
    differ = [uid for uid in sample if dataset_bytes(orthanc.download(ids[uid])) != file_dataset_bytes(by_uid[uid].path)]

    gw.stop_ok()
    fsck = gw.fsck()
    finished = time.monotonic()

    figures = {
        "rounds": ROUNDS,
        "power_cuts": len(cut_after),
        "accelerator": gw.accel,
        "accelerator_why": gw.accel_why,
        "instances_sent_by_modalities": len(instances),
        "c_store_attempts": sum(m.attempts for m in modalities),
        "acknowledged": len(acked),
        "delivered": len(held & set(by_uid)),
        "delivered_not_acknowledged": len((held & set(by_uid)) - acked),
        "lost": len(lost),
        "duplicates_upstream": sum(redelivered.values()),
        "instances_delivered_more_than_once": len(redelivered),
        "duplicates_upstream_counted_by_daemon": status["duplicates_upstream"],
        "duplicates_received_counted_by_daemon": status["duplicates_received"],
        "status_lost": status["lost"],
        "status_failed": status["failed"],
        "status_quarantined": status["quarantined"],
        "reboots_daemon_started": len(boot_secs) - 1,
        "acknowledged_checked_after_cuts": sum(c["acked_checked"] for c in checked),
        "ext4_journal_recoveries": log_text.count("EXT4-fs (vda): recovery complete"),
        "spool_temp_files_removed_at_start": sum(o[0] for o in opened),
        "spool_uploading_requeued_at_start": sum(o[1] for o in opened),
        "spool_lost_at_start": sum(o[2] for o in opened),
        # Rows lost with the WAL's unsynced tail, queued again from their pre-created files.
        "spool_taken_in_from_precreated_files_at_start": sum(o[3] for o in opened),
        "byte_identical_sample": len(sample) - len(differ),
        "byte_identical_sample_size": len(sample),
        "e2fsck_exit_code": fsck.returncode,
        "boot_to_c_echo_seconds_median": round(sorted(boot_secs)[len(boot_secs) // 2], 1),
        "cut_after_first_ack_seconds": cut_after,
        "acknowledged_at_each_cut": acked_at_cut,
        "campaign_seconds": round(rounds_done - started, 1),
        "drain_seconds": round(drained - rounds_done, 1),
        "test_seconds": round(finished - started, 1),
        "seed": SEED,
    }
    path = campaign.write_figures("power_cut", figures)
    print(f"figures ({path}): {figures}")

    assert not lost, f"{len(lost)} acknowledged instance(s) never reached Orthanc, e.g. {lost[:5]}"
    assert status["lost"] == 0 and status["failed"] == 0 and status["quarantined"] == 0, status
    assert figures["spool_lost_at_start"] == 0, figures
    unrecorded = (held & set(by_uid)) - received.keys()
    assert not unrecorded, f"Orthanc's Lua hook missed {len(unrecorded)} instance(s): the duplicate count is unsound"
    assert not differ, f"{len(differ)} of {len(sample)} sampled instances differ from what was sent: {differ[:5]}"
    assert status["duplicates_upstream"] >= figures["duplicates_upstream"], figures
    assert fsck.returncode == 0, f"e2fsck -fn found problems on the spool disk:\n{fsck.stdout}\n{fsck.stderr}"


def test_the_check_catches_a_daemon_that_skips_fsync(orthanc, vm_gateway, tmp_path: Path) -> None:
    """The instrument works: with every fsync turned into a no-op (`LD_PRELOAD=/lib/nofsync.so` in the
    VM, see tests/vm/build.py), instances acknowledged a moment before a power cut only lived in the
    guest's page cache, and the checks above fail after the reboot (the daemon refuses its spool, or
    finds rows lost, or the acknowledged instances have no row). Nothing is delivered (the uplink points
    at a closed port), so the spool is the only place they can be."""
    gw = vm_gateway(orthanc, name="vm-nofsync")
    gw.stow_url = f"https://localhost:{free_port()}/dicom-web/studies"  # nothing listens there
    gw.env["LD_PRELOAD"] = "/lib/nofsync.so"
    _boot(gw, 0)
    study = campaign.small_studies(tmp_path / "studies", 1, 12)
    assert pynetdicom_send(gw.port, study, gw.ae_title) == [0] * len(study)
    acked = {i.sop_instance_uid for i in study}
    rows = gw.spool_rows()
    assert acked <= rows.keys(), "before the cut, the running daemon shows every acknowledged row"
    gw.kill()  # well within ext4's 5 s journal commit and the 30 s writeback of dirty data
    with pytest.raises(AssertionError) as caught:
        _boot(gw, 1)
        _check_acknowledged_survived(gw, set(), acked, 1)
    message = str(caught.value)
    print(f"as expected, the power-cut check failed without fsync: {message[:400]}")
    assert re.search(r"passerelled exited with code|neither in the spool nor in Orthanc|only bad rows|'lost': [1-9]",
                     message), message
