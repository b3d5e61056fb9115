"""The WAN scenario's network: a namespace `pbench` joined to the host by a link of 100 Mbit/s each way, 20 ms
each way (40 ms RTT), 0.1% random loss on the data direction (namespace -> host), drop-tail at 10000 frames.
Where the kernel has sch_netem the link is a veth pair with tc netem on both ends; otherwise it is the
userspace delay line shims/delayline.c (compiled with cc into the given work dir): two TAP devices, the
host end and one moved into the namespace, the program forwarding frames between them with the same
serialisation, delay and loss. Both ways the devices are pbh0 (host, 10.77.0.1) and pbn0 (namespace,
10.77.0.2). passerelled and the sender run inside the namespace; Orthanc's TLS front (nginx) also listens
on the host end, 10.77.0.1. Inside the namespace `localhost` resolves to 10.77.0.1 (/etc/netns/pbench/hosts,
bind-mounted by `ip netns exec`), so the front's certificate (for localhost) still verifies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from harness.gateway import Gateway, passerelled_bin
from harness.orthanc import Orthanc
from harness.send import ECHOSCU
from harness.util import run, start_process, wait_until

NS = "pbench"
HOST_IF, NS_IF = "pbh0", "pbn0"
HOST_IP, NS_IP = "10.77.0.1", "10.77.0.2"
RATE_MBIT = 100
HOSTS_DIR = Path("/etc/netns") / NS


def _sh(*argv: str) -> None:
    run(list(argv), timeout=30, check=True)


DELAY_MS = 20
LOSS = 0.001  # on the data direction, namespace -> host
LIMIT = 10000
SHIM = Path(__file__).resolve().parent / "shims" / "delayline.c"
_delayline: subprocess.Popen | None = None


def setup(work: Path) -> str:
    """Builds the link; returns how it is emulated ("netem" or "delay line"), for the report."""
    teardown()
    _sh("ip", "netns", "add", NS)
    inns = ["ip", "netns", "exec", NS]
    _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    _sh("ip", "link", "set", NS_IF, "netns", NS)
    netem = ["root", "netem", "delay", f"{DELAY_MS}ms", "rate", f"{RATE_MBIT}mbit", "limit", str(LIMIT)]
    if run(["tc", "qdisc", "add", "dev", HOST_IF, *netem], timeout=30, check=False).returncode == 0:
        _sh(*inns, "tc", "qdisc", "add", "dev", NS_IF, *netem, "loss", f"{LOSS * 100:g}%")
        how = "netem"
    else:
        _sh("ip", "link", "del", HOST_IF)
        _start_delayline(work)
        _sh("ip", "link", "set", NS_IF, "netns", NS)
        how = "delay line"
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    _sh("ip", "link", "set", HOST_IF, "up")
    _sh(*inns, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
    _sh(*inns, "ip", "link", "set", NS_IF, "up")
    _sh(*inns, "ip", "link", "set", "lo", "up")
    HOSTS_DIR.mkdir(parents=True, exist_ok=True)
    (HOSTS_DIR / "hosts").write_text(f"127.0.0.1 ns-loopback\n{HOST_IP} localhost\n")
    return how


def _start_delayline(work: Path) -> None:
    global _delayline
    work.mkdir(parents=True, exist_ok=True)
    exe = work / "delayline"
    _sh("cc", "-O2", "-o", str(exe), str(SHIM))
    log = open(work / "delayline.log", "ab")
    try:
        # stdin is a pipe the program watches: it exits when the pipe closes, also if the benchmark dies.
        _delayline = subprocess.Popen([str(exe), HOST_IF, NS_IF, str(RATE_MBIT * 1_000_000), str(DELAY_MS * 1000),
                                       str(LOSS), "0", str(LIMIT)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    finally:
        log.close()
    assert _delayline.stdout is not None
    line = _delayline.stdout.readline()
    if line.strip() != b"ready":
        _delayline.wait(timeout=10)
        raise AssertionError(f"the delay line did not start (exit code {_delayline.returncode}); "
                             f"see {work / 'delayline.log'}")


def teardown() -> None:
    global _delayline
    if _delayline is not None:
        assert _delayline.stdin is not None
        _delayline.stdin.close()  # the program exits and its TAP devices go with it
        try:
            _delayline.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _delayline.kill()
            _delayline.wait(timeout=10)
        _delayline = None
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
    shutil.rmtree(HOSTS_DIR, ignore_errors=True)


class WanOrthanc(Orthanc):
    """Orthanc behind its nginx front, the front also listening on the host end of the veth pair."""

    def _write_configs(self) -> None:
        super()._write_configs()
        conf = self.dir / "nginx.conf"
        ssl = "ssl http2" if self.http2 else "ssl"
        line = f"listen 127.0.0.1:{self.https_port} {ssl};"
        conf.write_text(conf.read_text().replace(line, f"{line}\n        listen {HOST_IP}:{self.https_port} {ssl};"))


class NsGateway(Gateway):
    """passerelled started inside the namespace."""

    def start(self, wait_ready: bool = True) -> None:
        if not self.config_path.exists():
            self.write_config()
        self.prepare_for_daemon()
        self.starts += 1
        self.proc = start_process(["ip", "netns", "exec", NS, str(passerelled_bin()), "--config",
                                   str(self.config_path)], self.log_path, env=self._env())
        if wait_ready:
            def ok() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"passerelled exited with code {self.proc.returncode}\n{self.log_excerpt()}")
                return run(["ip", "netns", "exec", NS, ECHOSCU, "-aec", self.ae_title, "-to", "5", "127.0.0.1",
                            str(self.port)], timeout=20, check=False).returncode == 0

            wait_until(ok, 30, "passerelled in the namespace to answer C-ECHO", interval=0.2)
