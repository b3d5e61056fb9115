"""The demo (README's first command, via tests/demo.sh): a local Orthanc behind nginx HTTPS as the
regional PACS, passerelled in front of it, a generated CT study sent with dcmtk storescu, and the study
arriving. With --keep, everything keeps running until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import send  # noqa: E402
from harness.checks import wait_for_instances  # noqa: E402
from harness.data import generate_ct_study  # noqa: E402
from harness.gateway import Gateway, gateway_for  # noqa: E402
from harness.orthanc import PASSWORD, USERNAME, Orthanc  # noqa: E402
from harness.pki import make_pki  # noqa: E402
from harness.util import wait_until  # noqa: E402


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="keep Orthanc and passerelled running until Ctrl-C")
    ap.add_argument("--slices", type=int, default=200, help="CT slices to generate (default 200)")
    ap.add_argument("--workdir", type=Path, help="directory for everything (default: a new temp dir)")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="passerelle-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"Working directory: {work}")

    say("Making a test CA, a server certificate for localhost and a client certificate (mutual TLS)...")
    pki = make_pki(work / "pki")

    orthanc = Orthanc(dir=work / "orthanc", pki=pki)
    gw: Gateway | None = None
    try:
        say("Starting Orthanc (the regional PACS stand-in) behind an nginx HTTPS front door...")
        orthanc.start()
        say(f"Orthanc is up: {orthanc.base_url}/ (client certificate + basic auth {USERNAME}/{PASSWORD})")

        gw = gateway_for(work / "passerelled", orthanc, pki)
        say(f"Starting passerelled: AE title {gw.ae_title} on 127.0.0.1:{gw.port}, config {gw.config_path}")
        gw.start()

        say(f"Generating a CT study of {args.slices} slices (256x256, 16-bit)...")
        study = generate_ct_study(work / "study", slices=args.slices)
        say(f"Sending it with dcmtk storescu to {gw.ae_title}@127.0.0.1:{gw.port}...")
        t0 = time.monotonic()
        send.storescu(gw.port, study.instances, work / "storescu", called_ae=gw.ae_title, calling_ae="CT_DEMO")
        say(f"All {len(study.instances)} C-STOREs acknowledged in {time.monotonic() - t0:.1f} s "
            "(each only after the instance was safely on the gateway's disk).")  # fmt: skip

        n = len(study.instances)
        last = [-1]

        def progress() -> bool:
            c = orthanc.count_instances()
            if c != last[0]:
                say(f"  Orthanc holds {c}/{n} instances")
                last[0] = c
            return c >= n

        wait_until(progress, 300, "the study to arrive in Orthanc", interval=1.0)
        wait_until(lambda: gw.status()["sent"] >= n, 60, "passerelled to count the study as sent")
        say(f"The study arrived over HTTPS STOW-RS in {time.monotonic() - t0:.1f} s after the first C-STORE.")

        print()
        say("passerelled status:")
        print(gw.status_text().rstrip())
        print()
        stats = orthanc.statistics()
        say(f"Orthanc at {orthanc.base_url}/ holds {stats['CountStudies']} study, "
            f"{stats['CountSeries']} series, {stats['CountInstances']} instances "
            f"({stats['TotalDiskSizeMB']} MB).")  # fmt: skip
        say(f"  e.g. curl --cacert {pki.ca_cert} --cert {pki.client_cert} --key {pki.client_key} "
            f"-u {USERNAME}:{PASSWORD} {orthanc.base_url}/studies")  # fmt: skip
        wait_for_instances(orthanc, n, timeout=5)

        if args.keep:
            say(f"Running until Ctrl-C. Send more with: /usr/bin/storescu -aec {gw.ae_title} 127.0.0.1 {gw.port} FILES")
            say(f"Status: target/release/passerelled status --config {gw.config_path}")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(1.0):
                    if not gw.running:
                        say("passerelled exited.")
                        break
            except KeyboardInterrupt:
                pass
        say("Stopping passerelled (SIGTERM)...")
        gw.stop_ok()
        gw = None
        say(f"Done. Logs and configs are in {work}")
        return 0
    except BaseException:
        if gw is not None:
            print(gw.log_excerpt(60), file=sys.stderr)
        raise
    finally:
        if gw is not None:
            gw.cleanup()
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
