"""The side-by-side benchmark (issue 4). Run through `tests/bench.sh` (as root), or from `tests/`:

    python3 -m bench.run [--quick] [--runs N] [--only ingest,latency,forward,wan,ready] [--out FILE]

Every receiver is started fresh for every run, the receivers take turns within a run, and every result is a
ratio against a peer measured in the same run, so the load of a shared machine hits both sides alike.
Prints a table (median and min-max over the runs) and writes it, with the machine, to tests/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.data import Instance
from harness.gateway import passerelled_bin
from harness.pki import make_pki
from harness.send import STORESCU, storescu as harness_storescu, write_storescu_profile
from harness.util import wait_until

from . import datasets
from .receivers import OrthancScp, Passerelled, Receiver, StoreScp, build_shims, vm_hwm_kib, wipe

TESTS = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("BENCH_WORK", TESTS / ".work" / "bench-run"))
CALLING_AE = "MODALITY1"
STOCK_SUBSET = 200
# passerelled forwards with its shipped uplink settings (the harness pins a batch size for the system tests).
SHIPPED_UPLINK: dict[str, object] = {"batch_max_instances": None}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


# -- results --------------------------------------------------------------------------------------------


@dataclass
class Results:
    """name -> one value per run."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, v: float) -> None:
        self.values.setdefault(name, []).append(v)

    def get(self, name: str) -> list[float]:
        return self.values.get(name, [])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def span(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{fmt(med(xs))} ({fmt(min(xs))}–{fmt(max(xs))})"


# -- sending --------------------------------------------------------------------------------------------


@dataclass
class Sent:
    seconds: float
    instances: int
    bytes: int
    cpu: float


SENDER_ENV: dict[str, str] = {}


def storescu_send(port: int, called_ae: str, instances: list[Instance], assocs: int, workdir: Path,
                  netns: str | None = None) -> float:
    """dcmtk storescu, the same command for every receiver; `assocs` processes in parallel, each with its
    share of the files. Returns the wall time; raises unless every C-STORE succeeded.

    The sender always runs with TCP_NODELAY forced (SENDER_ENV, the LD_PRELOAD shim): stock storescu stalls
    on its own last segment of each instance (Nagle + delayed ACK), which would cap every receiver alike at
    about 20-40 instances/s and hide the differences between them."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg, profile = write_storescu_profile(instances, workdir / "storescu.cfg")
    chunks = [instances[k::assocs] for k in range(assocs)]
    prefix = ["ip", "netns", "exec", netns] if netns else []
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [*prefix, STORESCU, "-v", "-aet", CALLING_AE, "-aec", called_ae, "-xf", str(cfg), profile, "--no-halt",
             "127.0.0.1", str(port), *[str(i.path) for i in chunk]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **SENDER_ENV})
        for chunk in chunks if chunk
    ]  # fmt: skip
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    elapsed = time.monotonic() - t0
    ok = sum(len(re.findall(r"Received Store Response \(Success", o)) for o in outs)
    if ok != len(instances) or any(p.returncode != 0 for p in procs):
        raise AssertionError(f"storescu stored {ok} of {len(instances)} instances; tail:\n{outs[0][-3000:]}")
    return elapsed


def warm_files(instances: list[Instance]) -> None:
    """Reads the files once, so that no receiver's measure includes the sender's first reads from disk."""
    for i in instances:
        with open(i.path, "rb") as f:
            while f.read(1 << 20):
                pass


def ingest(rx: Receiver, instances: list[Instance], assocs: int, workdir: Path) -> Sent:
    cpu0 = rx.cpu()
    secs = storescu_send(rx.port, rx.ae_title, instances, assocs, workdir)
    rx.settle()
    return Sent(secs, len(instances), datasets.total_bytes(instances), rx.cpu() - cpu0)


DELIVERED_RE = re.compile(
    r"^\[(\S+) INFO +passerelle_uplink\] Delivered batch\..* instances=(\d+) .*elapsed_ms=(\d+) ")


def delivered(log_path: Path, skip: int = 0) -> tuple[float, list[tuple[float, int]]]:
    """When passerelled's uplink started its first delivered request, and (wall time, instances) of every
    request it delivered, in order, from its "Delivered batch" log lines (millisecond timestamps; a request
    started `elapsed_ms` before its line): the confirmations as the daemon saw them, with no polling load
    (`passerelled status` starts a process that opens the spool). The first `skip` requests (a warm-up) are
    left out. Feed to `stow.drain_rate`."""
    out: list[tuple[float, int]] = []
    started = float("inf")
    for line in log_path.read_text(errors="replace").splitlines():
        m = DELIVERED_RE.match(line)
        if m and skip > 0:
            skip -= 1
        elif m:
            t = dt.datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp()
            out.append((t, int(m[2])))
            started = min(started, t - int(m[3]) / 1000)
    return started, out


def delivered_count(log_path: Path, skip: int = 0) -> int:
    return sum(k for _, k in delivered(log_path, skip)[1])


DISK_PROBE_FILES = 100
DISK_PROBE_BYTES = 512 * 1024


def disk_probe(d: Path) -> float:
    """The disk's own price of one durable CT slice, in this run's phase: the median time, in ms, to create a
    file, write 0.5 MB into it and fdatasync it (what storescp with the fdatasync shim does per instance, with
    neither network nor DICOM), on the file system the receivers write to."""
    wipe(d)
    d.mkdir(parents=True)
    data = os.urandom(DISK_PROBE_BYTES)
    times = []
    try:
        for i in range(DISK_PROBE_FILES):
            t0 = time.perf_counter()
            fd = os.open(d / f"probe-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        wipe(d)
    return statistics.median(times)


# -- scenarios ------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.r = Results()
        self.notes: list[str] = []
        WORK.mkdir(parents=True, exist_ok=True)
        self.sets = datasets.datasets(quick=args.quick, log=log)
        self.pki = make_pki(WORK / "pki") if not (WORK / "pki" / "ca.pem").exists() else None
        if self.pki is None:
            wipe(WORK / "pki")
            self.pki = make_pki(WORK / "pki")
        self.shims = build_shims(WORK / "shims")
        self.backlog_count = 5000 if args.quick else 100_000
        SENDER_ENV["LD_PRELOAD"] = str(self.shims["nodelay"])

    def peers(self) -> list[Receiver]:
        out: list[Receiver] = []
        for nd in (False, True):
            out += [StoreScp("ignore", self.shims, nd), StoreScp("files", self.shims, nd),
                    StoreScp("fdatasync", self.shims, nd)]
            if not self.args.quick or self.args.orthanc:
                out.append(OrthancScp(self.pki, self.shims, nd))
        return out

    # 2. ingest
    def ingest_run(self, run: int) -> None:
        receivers: list[Receiver] = [Passerelled(self.pki), *self.peers()]
        if self.args.peers_filter:
            receivers = [x for x in receivers if x.name == "passerelled" or any(
                f == x.name for f in self.args.peers_filter)]
        cases = [("ct", 1), ("ct", 4)] + ([("mr", 1), ("mf", 1)] if not self.args.smoke else [])
        # Case by case, so that the receivers compared by a ratio are measured within seconds of each other (the
        # shared disk's speed drifts over a minute): passerelled and the +NODELAY peers back to back, in reverse
        # order every other run so that no receiver always goes first, then the stock peers (Nagle-bound, slow).
        fast = [x for x in receivers if x.name == "passerelled" or "NODELAY" in x.name]
        if run % 2 == 0:
            fast.reverse()
        ordered = fast + [x for x in receivers if x not in fast]
        # The sender reads its files from the page cache for every receiver, the first one included.
        warm_files([i for set_name, _ in cases for i in self.sets[set_name]])
        # The disk's phase moves the one-association rates of every durable receiver: measured before and after.
        self.r.add("disk ms", disk_probe(WORK / f"probe-{run}"))
        method = ("Ingest method. Case by case (CT on 1, then 4 associations, MR, MF), passerelled and the +NODELAY "
                  "peers are measured back to back, so that the receivers a ratio compares run within seconds of "
                  "each other; their order is reversed every other run, so that none always goes first. The stock "
                  "peers follow. After each receiver the disk is synced (outside any measure), so that none "
                  "measures with another's writes still pending. The sender's files are read once before each run, so that every receiver's "
                  "sender reads them from the page cache.")
        if method not in self.notes:
            self.notes.append(method)
        for set_name, assocs in cases:
            for rx in ordered:
                if set_name != "ct" and rx.name not in ("passerelled", "storescp --ignore +NODELAY",
                                                         "storescp -od +B fdatasync +NODELAY"):
                    continue
                if self.args.smoke and assocs != 1:
                    continue
                d = WORK / f"rx-{run}"
                wipe(d)
                instances = self.sets[set_name]
                if rx not in fast:
                    # Stock peers are bound by Nagle's algorithm (about 40 ms per C-STORE whatever the set
                    # size): the first 200 slices measure their rate as well, in a third of the time.
                    instances = instances[: min(len(instances), STOCK_SUBSET)]
                rx.start(d)
                try:
                    s = ingest(rx, instances, assocs, d / "send")
                    if rx.name == "passerelled" and set_name == "ct" and assocs == 1:
                        st = compacted_status(rx.gateway)  # type: ignore[attr-defined]
                        if st["stored_bytes"]:
                            self.r.add("storage ct raw/stored", st["raw_bytes"] / st["stored_bytes"])
                finally:
                    rx.stop()
                    wipe(d)
                    # Whatever a receiver left for the disk to write (a non-durable storescp's files, the metadata
                    # of a removed spool) is written now, not during the next receiver's measure.
                    os.sync()
                key = f"{rx.name}|{set_name}|{assocs}"
                self.r.add(f"ips|{key}", s.instances / s.seconds)
                self.r.add(f"mbs|{key}", s.bytes / s.seconds / 1e6)
                self.r.add(f"cpu|{key}", s.cpu / s.instances * 100)
                self.r.add(f"cpugb|{key}", s.cpu / s.bytes * 1e9)
                log(f"run {run} ingest {key}: {s.instances / s.seconds:.1f} inst/s, "
                    f"{s.bytes / s.seconds / 1e6:.1f} MB/s, cpu {s.cpu:.2f} s")
        self.r.add("disk ms", disk_probe(WORK / f"probe-{run}"))
        before_after = self.r.get("disk ms")[-2:]
        self.r.add("disk ips", 1000 / statistics.mean(before_after))
        log(f"run {run} disk: 0.5 MB write + fdatasync into a new file, median {before_after[0]:.2f} ms before and "
            f"{before_after[1]:.2f} ms after the ingest measures")

    # 2b. acknowledgement latency, paced at half the maximum one-association rate
    def latency_run(self, run: int) -> None:
        """pynetdicom sends CT slices one by one (TCP_NODELAY on its socket); the latency of one C-STORE is
        from its last P-DATA PDU leaving the sender to the response PDU arriving (pynetdicom's PDU events),
        so the sender's own encoding time is not counted."""
        from pynetdicom import AE, _config, evt
        from pynetdicom.transport import AssociationSocket

        _config.STORE_SEND_CHUNKED_DATASET = True
        if not getattr(AssociationSocket, "_bench_nodelay", False):
            original = AssociationSocket._create_socket

            def with_nodelay(sock_self, address):  # type: ignore[no-untyped-def]
                sock = original(sock_self, address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock

            AssociationSocket._create_socket = with_nodelay  # type: ignore[method-assign]
            AssociationSocket._bench_nodelay = True  # type: ignore[attr-defined]
        full = self.r.get("ips|passerelled|ct|1")
        rate = (med(full) / 2) if full else 25.0
        instances = self.sets["ct"][: min(len(self.sets["ct"]), 200)]
        for rx in (Passerelled(self.pki), StoreScp("ignore", self.shims, True)):
            d = WORK / f"lat-{run}"
            wipe(d)
            rx.start(d)
            lat: list[float] = []
            last_sent = [0.0]

            def on_sent(event) -> None:  # type: ignore[no-untyped-def]
                last_sent[0] = time.perf_counter()

            def on_recv(event) -> None:  # type: ignore[no-untyped-def]
                if last_sent[0]:
                    lat.append((time.perf_counter() - last_sent[0]) * 1000)
                    last_sent[0] = 0.0

            try:
                ae = AE(ae_title=CALLING_AE)
                ae.add_requested_context(instances[0].sop_class_uid, instances[0].transfer_syntax_uid)
                assoc = ae.associate("127.0.0.1", rx.port, ae_title=rx.ae_title)
                assert assoc.is_established, f"pynetdicom could not associate with {rx.name}"
                assoc.bind(evt.EVT_PDU_SENT, on_sent)
                assoc.bind(evt.EVT_PDU_RECV, on_recv)
                try:
                    nxt = time.monotonic()
                    for inst in instances:
                        now = time.monotonic()
                        if now < nxt:
                            time.sleep(nxt - now)  # pacing the sender, not synchronisation
                        nxt = max(nxt + 1 / rate, time.monotonic())
                        st = assoc.send_c_store(inst.path)
                        assert st and int(st.Status) == 0, f"{rx.name}: C-STORE failed"
                    assoc.unbind(evt.EVT_PDU_RECV, on_recv)
                finally:
                    assoc.release()
            finally:
                rx.stop()
                wipe(d)
            assert len(lat) == len(instances), f"{len(lat)} latencies for {len(instances)} C-STOREs"
            lat.sort()
            p50 = lat[len(lat) // 2]
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            self.r.add(f"lat50|{rx.name}", p50)
            self.r.add(f"lat99|{rx.name}", p99)
            log(f"run {run} latency {rx.name} at {rate:.0f}/s: p50 {p50:.2f} ms p99 {p99:.2f} ms")
        self.r.add("lat rate", rate)

    # 3 + 5. forwarding while ingest continues, peak RSS; the direct STOW-RS client
    def forward_run(self, run: int) -> None:
        """The CT set forwarded into Orthanc over HTTPS (nginx TLS front), measured four ways; see `method`.
        Every rate is a drain rate: instances per second from the start of the first request to the last
        (`stow.drain_rate`), taken from passerelled's "Delivered batch" log lines (no polling load) and
        from the direct client's own request times."""
        from harness.gateway import gateway_for
        from harness.orthanc import Orthanc

        from .stow import direct_stow_timed, drain_rate

        method = (
            "Forwarding method. The CT set goes into a fresh Orthanc behind its nginx TLS front for every "
            "measure. (1) *While ingest continues*: passerelled (shipped uplink settings: 4 connections, "
            "batches of up to 10 instances of one study) forwards while 4 storescu associations feed it. "
            "(2) *Direct client under the same ingest load*: the direct STOW-RS client (Python requests, "
            "batches of 10, 1 or 4 connections) posts the same files while the same 4 storescu associations "
            "feed a second passerelled whose upstream never answers (its ingest, compaction and storescu take "
            "the same CPU, its uplink sends nothing). On this 2-core machine Orthanc is CPU-bound (about 5 ms of "
            "CPU per instance), so this is the comparison the target is about: the same machine load, only "
            "the sender differs. (3) *Stock comparison*: the direct client on an otherwise idle machine, as "
            "earlier reports measured it. (4) *Uplink alone*: passerelled first ingests the whole set with "
            "the TLS front down, finishes compacting, then the front comes up and the backlog drains with "
            "nothing else running. Every rate counts every instance, from the start of the first request to the "
            "completion of the last (passerelled's \"Delivered batch\" log lines, each with its request's "
            "elapsed time; the client's own clock)."
        )
        if method not in self.notes:
            self.notes.append(method)
        inst = self.sets["ct"]
        n = len(inst)
        raw = datasets.total_bytes(inst)
        d = WORK / f"fwd-{run}"
        wipe(d)

        def fresh_orthanc(front: bool = True) -> Orthanc:
            wipe(d / "orthanc")
            o = Orthanc(dir=d / "orthanc", pki=self.pki)
            o.start()
            if not front:
                o.stop_front()
            return o

        def wait_delivered(rx: Passerelled, what: str) -> tuple[float, list[tuple[float, int]]]:
            g = rx.gateway
            assert g is not None
            hwm = 0

            def all_in() -> bool:
                nonlocal hwm
                hwm = max(hwm, vm_hwm_kib(rx.pid))
                return delivered_count(g.log_path) >= n

            wait_until(all_in, 1800, what, interval=0.1)
            assert g.status()["sent"] == n, "passerelled's log and its status disagree on what was delivered"
            self.fwd_hwm = max(hwm, vm_hwm_kib(rx.pid))
            return delivered(g.log_path)

        # (1) passerelled forwarding while 4 associations feed it.
        o = fresh_orthanc()
        rx = Passerelled(self.pki,
                         gateway_factory=lambda gd: gateway_for(gd, o, self.pki, extra_uplink=SHIPPED_UPLINK))
        try:
            rx.start(d / "gw")
            wall0, t0 = time.time(), time.monotonic()
            ingest_secs: list[float] = []
            sender = threading.Thread(target=lambda: ingest_secs.append(
                storescu_send(rx.port, rx.ae_title, inst, 4, d / "send")))
            sender.start()
            started, done = wait_delivered(rx, "passerelled to deliver every instance")
            sender.join()
        finally:
            rx.stop()
            o.stop()
        drain = drain_rate(started, done, n)
        secs = done[-1][0] - wall0
        self.r.add("fwd drain ips", drain)
        self.r.add("fwd e2e ips", n / secs)
        self.r.add("rss MB", self.fwd_hwm / 1024)
        log(f"run {run} forward: passerelled delivered {n} in {secs:.1f} s from the first C-STORE (ingest took "
            f"{ingest_secs[0] if ingest_secs else float('nan'):.1f} s); drain rate {drain:.1f}/s, end to end "
            f"{n / secs:.1f}/s ({raw / secs / 1e6:.1f} MB/s), VmHWM {self.fwd_hwm / 1024:.1f} MiB "
            f"[{time.monotonic() - t0:.1f} s]")

        # (2) the direct client while the same ingest load runs; (3) the direct client alone.
        for conns in (1, 4):
            o = fresh_orthanc()
            load = Passerelled(self.pki)
            try:
                load.start(d / f"load-{conns}")
                sender = threading.Thread(target=storescu_send, args=(load.port, load.ae_title, inst, 4,
                                                                     d / f"load-send-{conns}"))
                sender.start()
                started, done = direct_stow_timed(o, inst, batch=10, connections=conns)
                sender.join()
            finally:
                load.stop()
                o.stop()
            rate = drain_rate(started, done, n)
            self.r.add(f"stow{conns} load ips", rate)
            log(f"run {run} direct STOW-RS {conns} connection(s) under the same ingest load: {rate:.1f}/s")
            o = fresh_orthanc()
            try:
                started, done = direct_stow_timed(o, inst, batch=10, connections=conns)
            finally:
                o.stop()
            rate = drain_rate(started, done, n)
            self.r.add(f"stow{conns} ips", rate)
            log(f"run {run} direct STOW-RS {conns} connection(s), idle machine: {rate:.1f}/s")

        # (4) the uplink alone: a compacted backlog drained with nothing else running.
        o = fresh_orthanc(front=False)
        rx = Passerelled(self.pki,
                         gateway_factory=lambda gd: gateway_for(gd, o, self.pki, extra_uplink=SHIPPED_UPLINK))
        try:
            rx.start(d / "gw-backlog")
            storescu_send(rx.port, rx.ae_title, inst, 4, d / "send-backlog")
            compacted_status(rx.gateway)
            o.start_front()
            started, done = wait_delivered(rx, "passerelled to deliver its backlog")
        finally:
            rx.stop()
            o.stop()
        rate = drain_rate(started, done, n)
        self.r.add("fwd alone ips", rate)
        log(f"run {run} forward, uplink alone (compacted backlog, no ingest): {rate:.1f}/s")
        wipe(d)

    # 5b. start to ready with a large queue
    def ready_run(self, run: int) -> None:
        from harness.gateway import Gateway
        from harness.send import echoscu

        from .backlog import build_spool

        count = self.backlog_count
        spool = build_spool(datasets.WORK / f"backlog-{count}", count, self.pki, SENDER_ENV, log=log)
        d = WORK / f"ready-{run}"
        wipe(d)
        g = Gateway(dir=d, stow_url="https://127.0.0.1:9/dicom-web/studies", ca_file=self.pki.ca_cert)
        g.write_config()
        # Hard links for the (never modified) instance files, real copies of the SQLite files.
        subprocess.run(["cp", "-al", str(spool), str(g.spool_dir)], check=True)
        for db in [*g.spool_dir.glob("spool.db*"), *g.spool_dir.glob("spool.lock")]:
            db.unlink()
            subprocess.run(["cp", "-a", str(spool / db.name), str(db)], check=True)
        try:
            t0 = time.monotonic()
            g.start(wait_ready=False)
            wait_until(lambda: echoscu(g.port, g.ae_title).returncode == 0, 300, "passerelled to answer C-ECHO",
                       interval=0.005)
            secs = time.monotonic() - t0
            st = g.status()
            held = st["queued"] + st["uploading"]
            assert held >= count, f"only {held} of {count} instances held after the start"
            g.stop_ok()
        finally:
            g.cleanup()
            wipe(d)
        self.r.add("ready s", secs)
        log(f"run {run} ready with {count} queued: {secs:.2f} s")

    # 4. WAN
    def wan_run(self, run: int) -> None:
        from harness.orthanc import PASSWORD, USERNAME

        from . import wan
        from .stow import drain_rate

        method = (
            "WAN method. 200 CT slices go from a sender in the namespace over the emulated link to a fresh "
            "Orthanc (nginx TLS front) for each measure: passerelled fed by 4 storescu associations (shipped "
            "uplink settings, HTTP/1.1; one MR instance of another study delivered first, as on a box already "
            "forwarding, because a freshly started uplink probes the upstream with one connection); the same "
            "with `uplink.http2 = true` to a front end that also speaks HTTP/2 with request-body windows of "
            "1 MiB per stream (http2_body_preread_size, client_body_buffer_size), its four requests then "
            "streams of one connection; then the direct STOW-RS client (batches of 10, HTTP/1.1) over 1 and "
            "over 4 connections. "
            "Utilisation is the whole payload (Part-10 file bytes), over the time from the start of the first "
            "request to the completion of the last (handshakes and slow start included), over the link's "
            "100 Mbit/s; passerelled's requests come from its \"Delivered batch\" log lines (each with its "
            "request's elapsed time), the client's from its own clock. Earlier reports counted from the first "
            "confirmation, which let bytes already in flight on other connections count as after it."
        )
        if method not in self.notes:
            self.notes.append(method)
        capacity = wan.RATE_MBIT * 1e6 / 8  # bytes/s
        inst = self.sets["ct"][: min(len(self.sets["ct"]), 200)]
        n, raw = len(inst), datasets.total_bytes(inst)
        d = WORK / f"wan-{run}"
        wipe(d)
        try:
            how = wan.setup(WORK / "shims")
        except AssertionError as e:
            wan.teardown()
            note = ("WAN scenario not run: the link could not be emulated (neither tc netem nor the delay line: "
                    f"{str(e).strip().splitlines()[-1]}).")
            if note not in self.notes:
                self.notes.append(note)
            log(note)
            return
        if how != "netem":
            note = ("WAN link emulated by the userspace delay line (tests/bench/shims/delayline.c, two TAP devices; "
                    "this kernel has no sch_netem): same rate, delay, loss and queue limit as the netem setup.")
            if note not in self.notes:
                self.notes.append(note)

        def passerelled_over_wan(http2: bool) -> None:
            """passerelled fed by 4 associations, its upload over the link to a fresh Orthanc whose front end
            speaks HTTP/2 (`uplink.http2` on) or HTTP/1.1 only (the shipped settings)."""
            o = wan.WanOrthanc(dir=d / "orthanc", pki=self.pki, http2=http2)
            try:
                o.start()
                g = wan.NsGateway(dir=d / "gw", stow_url=o.stow_url, ca_file=self.pki.ca_cert,
                                  client_cert=self.pki.client_cert, client_key=self.pki.client_key,
                                  username=USERNAME, password=PASSWORD,
                                  extra_uplink={**SHIPPED_UPLINK, "http2": http2})
                g.write_config()
                g.start()
                try:
                    # Warm-up: one MR instance (another study) delivered first, as on a box already forwarding.
                    # Until its upstream has confirmed a request the uplink sends on one connection only (it
                    # does not open four against a PACS that may refuse them all); that probe is not the
                    # link's use.
                    storescu_send(g.port, g.ae_title, self.sets["mr"][:1], 1, d / "warm", netns=wan.NS)
                    wait_until(lambda: delivered_count(g.log_path) >= 1, 120, "passerelled to deliver the warm-up "
                               "instance over the WAN", interval=0.2)
                    wall0 = time.time()
                    sender = threading.Thread(target=storescu_send, args=(g.port, g.ae_title, inst, 4, d / "send"),
                                              kwargs={"netns": wan.NS})
                    sender.start()
                    # Reading the log is cheap (no process, no spool open), but once a second is plenty: the
                    # times come from the log lines themselves, not from when this loop notices them.
                    wait_until(lambda: delivered_count(g.log_path, skip=1) >= n, 1800,
                               "passerelled to deliver every instance over the WAN", interval=1.0)
                    started, done = delivered(g.log_path, skip=1)
                    sender.join()
                    assert g.status()["sent"] == n + 1, "passerelled's log and its status disagree on what was delivered"
                    versions = set(re.findall(r"Delivered batch\..* http_version=(\S+)", g.log_path.read_text()))
                    assert versions == {"HTTP/2" if http2 else "HTTP/1.1"}, f"passerelled spoke {versions}"
                    g.stop_ok()
                finally:
                    g.cleanup()
            finally:
                o.stop()
                for sub in ("orthanc", "gw", "warm", "send"):
                    wipe(d / sub)
            util = drain_rate(started, done, n) * raw / n / capacity
            key, how = ("wan h2 util", "HTTP/2") if http2 else ("wan util", "HTTP/1.1")
            self.r.add(key, util)
            log(f"run {run} WAN: passerelled ({how}) {n} instances in {done[-1][0] - wall0:.1f} s from the first "
                f"C-STORE, {done[-1][0] - started:.1f} s from the start of its first request to the last "
                f"confirmation ({len(done)} requests), utilisation {util:.2f}")

        o = None
        try:
            passerelled_over_wan(http2=False)
            passerelled_over_wan(http2=True)
            o = wan.WanOrthanc(dir=d / "orthanc", pki=self.pki)
            o.start()
            for conns in (1, 4):
                if conns == 4:
                    o.stop()
                    wipe(d / "orthanc")
                    o = wan.WanOrthanc(dir=d / "orthanc", pki=self.pki)
                    o.start()
                cp = subprocess.run(
                    ["ip", "netns", "exec", wan.NS, sys.executable, "-m", "bench.stow", o.stow_url,
                     str(self.pki.ca_cert), str(self.pki.client_cert), str(self.pki.client_key), USERNAME, PASSWORD,
                     str(conns), *[str(i.path) for i in inst]],
                    capture_output=True, text=True, cwd=TESTS, timeout=1800)
                if cp.returncode != 0:
                    raise AssertionError(f"direct STOW-RS over the WAN failed:\n{cp.stderr[-3000:]}")
                timed = json.loads(cp.stdout.strip().splitlines()[-1])
                sdone = [(t, k) for t, k in timed["done"]]
                u = drain_rate(timed["t0"], sdone, n) * raw / n / capacity
                self.r.add(f"wan stow{conns} util", u)
                log(f"run {run} WAN: direct STOW-RS, {conns} connection(s): {sdone[-1][0] - timed['t0']:.1f} s from "
                    f"the start of its first request to the last confirmation, utilisation {u:.2f}")
        finally:
            if o is not None:
                o.stop()
            wan.teardown()
            wipe(d)

    def storage_real(self) -> None:
        d = WORK / "storage-real"
        wipe(d)
        rx = Passerelled(self.pki)
        rx.start(d)
        try:
            harness_storescu(rx.port, self.sets["real"], d / "send", called_ae=rx.ae_title)
            st = compacted_status(rx.gateway)  # type: ignore[union-attr]
        finally:
            rx.stop()
            wipe(d)
        self.r.add("storage real raw/stored", st["raw_bytes"] / st["stored_bytes"])

    def run(self, after_each_run=lambda run: None) -> None:  # type: ignore[no-untyped-def]
        only = set(self.args.only.split(",")) if self.args.only else {"ingest", "latency", "forward", "storage",
                                                                                "wan", "ready"}
        for run in range(1, self.args.runs + 1):
            if "ingest" in only:
                self.ingest_run(run)
            if "latency" in only:
                self.latency_run(run)
            if "forward" in only:
                self.forward_run(run)
            if "wan" in only:
                self.wan_run(run)
            if "ready" in only:
                self.ready_run(run)
            self.runs_done = run
            if "storage" in only and run == 1:
                self.storage_real()
            after_each_run(run)


# -- the table ------------------------------------------------------------------------------------------


def compacted_status(gateway, timeout: float = 300.0) -> dict:  # type: ignore[no-untyped-def]
    """The daemon's status once its compactor has recompressed every intake file (what the spool
    holds at rest); the ingest rates above were measured before, with compaction running beside."""
    deadline = time.monotonic() + timeout
    while True:
        st = gateway.status()
        if st.get("awaiting_compaction", 0) == 0:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"compaction did not finish in {timeout} s: {st}")
        time.sleep(0.2)


def ratio(r: Results, a: str, b: str) -> list[float]:
    xs, ys = r.get(a), r.get(b)
    return [x / y for x, y in zip(xs, ys) if y]


def verdict(xs: list[float], target: float, higher_is_better: bool = True) -> str:
    if not xs:
        return "n/a"
    m = med(xs)
    return "PASS" if (m >= target if higher_is_better else m <= target) else "MISS"


def table(r: Results) -> str:
    rows: list[tuple[str, str, str, str]] = []  # measure, median (min–max), target, verdict
    P = "passerelled"

    def vs(label: str, key_a: str, key_b: str, target: float | None) -> None:
        xs = ratio(r, key_a, key_b)
        if xs:
            rows.append((label, span(xs) + "×", f"≥ {target}×" if target else "—",
                         verdict(xs, target) if target else "—"))

    targets = {"storescp --ignore +NODELAY": 0.7, "storescp -od +B fdatasync +NODELAY": 1.2,
               "Orthanc SyncStorageArea +NODELAY": 3.0, "Orthanc SyncStorageArea": 20.0}
    peers = sorted({k.split("|")[1] for k in r.values if k.startswith("ips|")} - {P})
    for assocs in (1, 4):
        for peer in peers:
            vs(f"CT, {assocs} assoc: passerelled / {peer} (instances/s)",
               f"ips|{P}|ct|{assocs}", f"ips|{peer}|ct|{assocs}", targets.get(peer) if assocs == 1 else None)
    for s in ("mr", "mf"):
        for peer in ("storescp --ignore +NODELAY", "storescp -od +B fdatasync +NODELAY"):
            vs(f"{s.upper()}, 1 assoc: passerelled / {peer} (instances/s)", f"ips|{P}|{s}|1", f"ips|{peer}|{s}|1",
               None)
    vs("CT: passerelled 4 assoc / 1 assoc (instances/s)", f"ips|{P}|ct|4", f"ips|{P}|ct|1", 1.3)
    for peer in ("storescp -od +B fdatasync +NODELAY", "Orthanc SyncStorageArea +NODELAY"):
        xs = ratio(r, f"cpu|{P}|ct|1", f"cpu|{peer}|ct|1")
        if xs:
            rows.append((f"CT, 1 assoc: CPU s per 100 instances, passerelled / {peer}", span(xs) + "×", "—", "—"))
    if r.get("disk ms"):
        rows.append(("The disk alone: create, write 0.5 MB and fdatasync one file, ms (no network, no DICOM; "
                     "before and after each run's ingest measures)", span(r.get("disk ms")), "—", "—"))
    for rx in (P, "storescp -od +B fdatasync +NODELAY"):
        vs(f"CT, 1 assoc: {rx} / the disk alone (instances/s against files/s of that loop, the mean of its "
           "two medians in the same run)", f"ips|{rx}|ct|1", "disk ips", None)
    lat = r.get(f"lat99|{P}")
    if r.get(f"lat50|{P}"):
        rows.append(("p50 C-STORE acknowledgement latency, same conditions, ms (passerelled)", span(r.get(f"lat50|{P}")),
                     "—", "—"))
        rows.append(("p50 / p99 acknowledgement latency, storescp --ignore +NODELAY (the sender's floor), ms",
                     f"{span(r.get('lat50|storescp --ignore +NODELAY'))} / {span(r.get('lat99|storescp --ignore +NODELAY'))}",
                     "—", "—"))
    if lat:
        rows.append((f"p99 C-STORE acknowledgement latency (last PDU sent to response), 0.5 MB, at half max rate ({fmt(med(r.get('lat rate')))}/s), ms",
                     span(lat), "≤ 10", verdict(lat, 10, higher_is_better=False)))
        vs("p99 ack latency: passerelled / storescp --ignore +NODELAY (same pynetdicom sender)",
           f"lat99|{P}", "lat99|storescp --ignore +NODELAY", None)
    for conns in (1, 4):
        vs(f"Forwarding while ingest continues: drain rate / direct STOW-RS under the same ingest load, batches of "
           f"10, {conns} connection{'s' if conns > 1 else ''}", "fwd drain ips", f"stow{conns} load ips", 0.9)
    for conns in (1, 4):
        vs(f"Forwarding (stock comparison): drain rate while ingest continues / direct STOW-RS on an idle machine, "
           f"batches of 10, {conns} connection{'s' if conns > 1 else ''}", "fwd drain ips", f"stow{conns} ips", 0.9)
    for conns in (1, 4):
        vs(f"Uplink alone (compacted backlog, no ingest) / direct STOW-RS on an idle machine, {conns} "
           f"connection{'s' if conns > 1 else ''}", "fwd alone ips", f"stow{conns} ips", None)
    vs("WAN: passerelled utilisation / direct STOW-RS, 1 connection", "wan util", "wan stow1 util", None)
    vs("WAN: passerelled utilisation / direct STOW-RS, 4 connections", "wan util", "wan stow4 util", None)
    vs("WAN: passerelled utilisation with uplink.http2 / direct STOW-RS, 4 connections", "wan h2 util",
       "wan stow4 util", None)
    for key, label, target, hib in (
        ("wan util", "WAN utilisation (payload bytes/s / 100 Mbit/s), shipped settings (HTTP/1.1, 4 connections)",
         0.9, True),
        ("wan h2 util", "WAN utilisation, uplink.http2 to an HTTP/2 front end with 1 MiB stream windows (4 streams, "
         "one connection)", 0.9, True),
        ("rss MB", "Peak RSS (VmHWM), 4-assoc ingest + upload, MiB", 64, False),
        ("ready s", "Start to first C-ECHO with 100,000 queued (5,000 in --quick), s", 2, False),
        ("storage ct raw/stored", "Storage ratio, CT (raw / on disk)", 2.0, True),
        ("storage real raw/stored", "Storage ratio, real test files (raw / on disk)", None, True),
    ):
        xs = r.get(key)
        if xs:
            tgt = "—" if target is None else (f"≥ {target}" if hib else f"≤ {target}")
            rows.append((label, span(xs), tgt, "—" if target is None else verdict(xs, target, hib)))
    lines = ["| measure | median (min–max) | target | result |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "Absolute numbers (median (min–max) over the runs):", "",
              "| receiver | dataset | assocs | instances/s | MB/s | CPU s / 100 instances | CPU s / GB |",
              "|---|---|---|---|---|---|---|"]
    for k in sorted(x for x in r.values if x.startswith("ips|")):
        _, name, s, a = k.split("|")
        rest = f"{name}|{s}|{a}"
        lines.append(f"| {name} | {s} | {a} | {span(r.get(k))} | {span(r.get('mbs|' + rest))} | "
                     f"{span(r.get('cpu|' + rest))} | {span(r.get('cpugb|' + rest))} |")
    for key, label in (("fwd drain ips", "passerelled drain into Orthanc (HTTPS) while ingest continues, from the first "
                                         "delivery, instances/s"),
                       ("fwd e2e ips", "passerelled, first C-STORE (4 assoc) to last delivery, instances/s"),
                       ("fwd alone ips", "passerelled drain of a compacted backlog, no ingest, instances/s"),
                       ("stow1 load ips", "direct STOW-RS, 1 connection, same ingest load, instances/s"),
                       ("stow4 load ips", "direct STOW-RS, 4 connections, same ingest load, instances/s"),
                       ("stow1 ips", "direct STOW-RS, 1 connection, idle machine, instances/s"),
                       ("stow4 ips", "direct STOW-RS, 4 connections, idle machine, instances/s")):
        if r.get(key):
            lines.append(f"| {label} | ct | — | {span(r.get(key))} | | | |")
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> list[dict[str, str]]:
    """The first table of `text` as dicts (used by the smoke test)."""
    out: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            if header is not None:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-"):
            out.append(dict(zip(header, cells)))
    return out


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = Path("/proc/loadavg").read_text().split()[:3]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=TESTS).stdout
    built = dt.datetime.fromtimestamp(passerelled_bin().stat().st_mtime, dt.timezone.utc)
    return (f"- passerelled: {passerelled_bin()}, built {built:%Y-%m-%d %H:%M} UTC, repository at {head.strip()}\n"
            f"- nproc: {os.cpu_count()}\n- CPU: {cpu}\n- kernel: {platform.release()}\n"
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n- load average at the end: {' '.join(load)}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small datasets, 2 runs, no Orthanc ingest peer")
    ap.add_argument("--smoke", action="store_true", help="(tests) one CT case, passerelled vs storescp --ignore")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--only", default="", help="comma list of ingest,latency,forward,storage,wan,ready")
    ap.add_argument("--orthanc", action="store_true", help="with --quick: include the Orthanc ingest peers")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default tests/PERFORMANCE.md "
                    "for a full run, tests/.work/PERFORMANCE-quick.md otherwise)")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.smoke else 2 if args.quick else 5)
    args.peers_filter = ["storescp --ignore"] if args.smoke else []
    if args.smoke:
        args.quick = True
        args.only = args.only or "ingest"
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    bench = Bench(args)
    bench.notes.append(f"Load average (1, 5, 15 min) when the benchmark started: {load0}. The machine is shared; "
                       "other engineers' builds and tests ran at the same time, hence ratios within each run.")
    bench.runs_done = 0
    t0 = time.monotonic()
    out = args.out or (TESTS / "PERFORMANCE.md" if not args.quick else TESTS / ".work" / "PERFORMANCE-quick.md")

    kept = ""  # a hand-written "## Observations" section at the end of an earlier report is kept
    if out.exists() and "\n## Observations" in out.read_text():
        kept = out.read_text()[out.read_text().index("\n## Observations"):]

    def report(run: int) -> str:
        text = table(bench.r)
        ds = ", ".join(f"{k}: {len(v)} instances, {datasets.total_bytes(v) / 1e6:.0f} MB" for k, v in bench.sets.items())
        out.write_text(
            "# Performance: passerelled side by side with its peers\n\n"
            "Generated by `sudo bash tests/bench.sh` (tests/bench/). Every ratio is computed per run against a peer "
            f"measured in the same run; median (min–max) over {run} of {args.runs} run(s). "
            f"Wall time {time.monotonic() - t0:.0f} s.\n\n"
            f"Datasets: {ds}. Stock (Nagle) peers get the first {STOCK_SUBSET} CT slices. "
            "The sender is always dcmtk storescu with TCP_NODELAY forced (stock storescu stalls on its own "
            "last segment of each instance).\n\n"
            + text + "\n## Machine\n\n" + machine() + "".join(f"\n{n}\n" for n in bench.notes) + kept
        )
        log(f"Wrote {out} ({run} of {args.runs} runs)")
        return text

    bench.run(after_each_run=report)
    print("\n" + table(bench.r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
