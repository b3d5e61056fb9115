"""3. An upstream outage while a modality is sending delays delivery but loses nothing."""

from __future__ import annotations

from pathlib import Path

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.util import wait_until


def test_orthanc_outage_delays_but_loses_nothing(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    study = ct_study.instances
    n = len(study)
    first, second = study[: n // 2], study[n // 2 :]
    gw = make_gateway(orthanc, extra_uplink={"batch_max_instances": 10})
    gw.start()

    send.storescu(gw.port, first, tmp_path / "scu1", called_ae=gw.ae_title)
    wait_for_instances(orthanc, len(first), timeout=120, what="the first half, before the outage")

    # The PACS goes down (nginx then answers 502 Bad Gateway); the modality goes on sending, and every
    # C-STORE is still acknowledged.
    orthanc.stop_orthanc()
    send.storescu(gw.port, second, tmp_path / "scu2", called_ae=gw.ae_title)

    # The outage is visible to the operator and nothing is dropped.
    status = wait_until(
        lambda: (s := gw.status())["last_error"] and s["queued"] + s["uploading"] > 0 and s,
        60,
        "status to show the upstream error with instances waiting",
    )
    assert status["lost"] == 0 and status["failed"] == 0, status
    assert status["queued"] + status["uploading"] + status["sent"] == n, status
    assert status["oldest_queued_age_secs"] is not None, status
    # Stay down "for a while": until the oldest waiting instance has waited longer than retry_max_secs,
    # so several retry rounds have failed. Still nothing lost or failed.
    status = wait_until(
        lambda: (s := gw.status())["oldest_queued_age_secs"] is not None and s["oldest_queued_age_secs"] >= 6 and s,
        60,
        "the outage to last a few retry rounds",
    )
    assert status["lost"] == 0 and status["failed"] == 0 and status["sent"] < n, status
    assert status["last_error"], status
    # Meanwhile the spool compresses what it stored as received (its compactor runs once ingest
    # pauses); the byte-identity check below then reads compacted files.
    status = wait_until(
        lambda: (s := gw.status())["awaiting_compaction"] == 0 and s,
        60,
        "the waiting instances to be compressed at rest",
    )
    assert status["stored_bytes"] * 3 < status["raw_bytes"] * 2, status

    orthanc.start_orthanc()
    wait_for_instances(orthanc, n, timeout=180, what="everything after the outage")
    status = wait_until(lambda: (s := gw.status())["sent"] == n and s, 60, f"status to show {n} sent")
    assert status["lost"] == 0 and status["failed"] == 0 and status["queued"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in study})
    gw.stop_ok()
