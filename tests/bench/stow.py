"""A direct STOW-RS client (requests), the reference for the forwarding scenario: posts Part-10 files to
Orthanc's TLS front in batches, over 1 or more connections (one session per connection)."""

from __future__ import annotations

import threading
import time

from harness.data import Instance
from harness.orthanc import Orthanc

BOUNDARY = "bench-boundary-5e2a9c"


def _body(batch: list[Instance]):
    for i in batch:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(i.path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def drain_rate(started: float, done: list[tuple[float, int]], total: int) -> float:
    """Instances per second from the start of the first request to the completion of the last, every
    instance counted, given that start and each request's (completion time, instances), all on one clock
    (the client's monotonic clock, or the wall clock of passerelled's log lines, whose first request
    started `elapsed_ms` before its line). The same measure for the direct client and for passerelled's
    uplink, whatever the number of connections: the whole transfer, handshakes and slow start included."""
    t_last = max(t for t, _ in done)
    if t_last <= started or sum(k for _, k in done) < total:
        raise AssertionError(f"cannot compute a drain rate from {len(done)} request(s) for {total} instances")
    return total / (t_last - started)


def direct_stow_timed(o: Orthanc, instances: list[Instance], batch: int,
                      connections: int) -> tuple[float, list[tuple[float, int]]]:
    """Posts every instance; returns the start time and each request's (completion time, instances),
    in completion order (time.monotonic()). Raises on any non-200 answer."""
    batches = [instances[k:k + batch] for k in range(0, len(instances), batch)]
    lock = threading.Lock()
    errors: list[str] = []
    done: list[tuple[float, int]] = []

    def worker() -> None:
        with o.session() as s:
            while True:
                with lock:
                    if not batches or errors:
                        return
                    b = batches.pop(0)
                r = s.post(o.stow_url, data=_body(b), timeout=600, headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                    "Accept": "application/dicom+json"})
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:300]}")
                    else:
                        done.append((time.monotonic(), len(b)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"direct STOW-RS failed: {errors[0]}")
    return t0, done


def main() -> int:
    """`python3 -m bench.stow URL CA CERT KEY USER PASSWORD CONNECTIONS FILE...`: posts FILEs in batches of
    10 and prints, as one JSON line, the start time and each request's [completion time, instances] in
    completion order (time.monotonic(); used inside the WAN namespace, fed to `drain_rate`)."""
    import json
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import requests

    url, ca, cert, key, user, password, conns, *files = sys.argv[1:]

    def session() -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify, s.cert, s.auth = ca, (cert, key), (user, password)
        return s

    fake = SimpleNamespace(stow_url=url, session=session)
    inst = [Instance(path=Path(f), name="", sop_class_uid="", sop_instance_uid="", study_instance_uid="",
                     transfer_syntax_uid="") for f in files]
    t0, done = direct_stow_timed(fake, inst, batch=10, connections=int(conns))  # type: ignore[arg-type]
    print(json.dumps({"t0": t0, "done": done}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
