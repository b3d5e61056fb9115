"""A box's wall clock that goes back while passerelled runs (it ran ahead until NTP corrected it) must not hold
the uploads scheduled under the wrong time until the clock catches up: here 30 days."""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from harness import send
from harness.checks import assert_byte_identical, wait_for_instances
from harness.data import Study
from harness.util import wait_until

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
RESCHEDULED = "Found queued instances scheduled more than 7 days ahead"


def test_retries_scheduled_under_a_clock_30_days_ahead_go_once_it_is_set_back(
    orthanc, make_gateway, ct_study: Study, storescu_reference: dict[str, bytes], tmp_path: Path
) -> None:
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: install the Debian package libfaketime (tests/setup.sh does)")
    few = ct_study.instances[:5]
    # libfaketime moves the daemon's wall clock (CLOCK_REALTIME) only, by the offset in this file, which it
    # reads again every second; the monotonic clock (timeouts, backoffs) stays real.
    offset = tmp_path / "clock-offset"
    offset.write_text("+30d\n")
    gw = make_gateway(orthanc)
    gw.env.update({
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    })

    # The PACS is down: the uploads fail and are scheduled again, 30 days ahead of the real time.
    orthanc.stop_orthanc()
    gw.start()
    send.storescu(gw.port, few, tmp_path / "scu", called_ae=gw.ae_title)
    retried = re.compile(r"Upload not confirmed; it will be retried\..* next_attempt_at=\"([^\"]+)\"")
    seen = wait_until(lambda: retried.findall(gw.log_path.read_text()), 60, "an upload to fail and be retried")
    ahead = parsedate_to_datetime(seen[0]).timestamp() - time.time()
    assert ahead > 29 * 86400, f"the retry is not scheduled under the daemon's clock 30 days ahead: {seen}"

    # NTP corrects the clock: 30 days back, while the PACS is still down (were it back first, the retry due
    # a second later under the wrong clock could go before the daemon saw the change). The daemon makes
    # what was scheduled a month ahead due at once and says why; without that, nothing is tried for 30 days.
    (tmp_path / "clock-offset.new").write_text("+0\n")
    (tmp_path / "clock-offset.new").replace(offset)  # whole, never half-written, when libfaketime reads it
    wait_until(lambda: RESCHEDULED in gw.log_path.read_text(), 60,
               "the daemon to make the retries scheduled under the wrong clock due")

    # The PACS comes back; everything arrives within the retry backoff's seconds, not in a month.
    orthanc.start_orthanc()
    wait_for_instances(orthanc, len(few), timeout=60, what="the instances scheduled under the wrong clock")
    assert_byte_identical(orthanc, {i.sop_instance_uid: storescu_reference[i.sop_instance_uid] for i in few})
    status = gw.status()
    assert status["lost"] == 0 and status["failed"] == 0, status
