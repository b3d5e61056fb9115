"""Checks shared by the system tests: what Orthanc holds, byte for byte."""

from __future__ import annotations

from .orthanc import Orthanc
from .part10 import dataset_bytes
from .util import wait_until


def wait_for_instances(orthanc: Orthanc, n: int, timeout: float = 120, what: str = "") -> int:
    """Polls until Orthanc holds at least `n` instances; returns the count."""
    return wait_until(
        lambda: (c := orthanc.count_instances()) >= n and c,
        timeout,
        f"Orthanc to hold {n} instances{' (' + what + ')' if what else ''}",
        interval=0.5,
    )


def assert_byte_identical(orthanc: Orthanc, expected: dict[str, bytes]) -> None:
    """Orthanc holds exactly the SOP Instance UIDs of `expected`, and the dataset after group 0002 of each
    stored file is byte-identical to the expected bytes (what the modality put on the wire)."""
    held = orthanc.sop_instance_uids()
    missing = sorted(expected.keys() - held.keys())
    extra = sorted(held.keys() - expected.keys())
    assert not missing, f"{len(missing)} instance(s) never reached Orthanc, e.g. {missing[:5]}"
    assert not extra, f"Orthanc holds {len(extra)} unexpected instance(s), e.g. {extra[:5]}"
    differ: list[str] = []
    with orthanc.session() as s:
        for uid, iid in held.items():
            r = s.get(f"{orthanc.base_url}/instances/{iid}/file", timeout=60)
            r.raise_for_status()
            got = dataset_bytes(r.content)
            want = expected[uid]
            if got != want:
                at = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
                differ.append(f"{uid}: {len(got)} bytes stored vs {len(want)} sent, first difference at byte {at}")
    assert not differ, f"{len(differ)} instance(s) differ from what was sent:\n" + "\n".join(differ[:10])


def assert_all_delivered(gw, orthanc: Orthanc, instances, reference: dict[str, bytes], what: str) -> dict:
    """`gw` (started) delivers every one of `instances` to `orthanc`: all counted sent, none failed or lost, and
    Orthanc holds exactly them, byte-identical to `reference` (SOP Instance UID -> the bytes on the wire).
    Returns the final status."""
    wait_for_instances(orthanc, len(instances), timeout=120, what=what)
    status = wait_until(lambda: (s := gw.status())["sent"] == len(instances) and s, 60, f"all sent ({what})")
    assert status["lost"] == 0 and status["failed"] == 0, status
    assert_byte_identical(orthanc, {i.sop_instance_uid: reference[i.sop_instance_uid] for i in instances})
    return status
