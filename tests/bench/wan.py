"""The WAN scenario's network: a namespace `pbench` joined to the host by a veth pair, with tc netem on both
ends (100 Mbit/s each way, 20 ms each way = 40 ms RTT, 0.1% loss on the data direction). passerelled and the
sender run inside the namespace; Orthanc's TLS front (nginx) also listens on the host end, 10.77.0.1. Inside
the namespace `localhost` resolves to 10.77.0.1 (/etc/netns/pbench/hosts, bind-mounted by `ip netns exec`),
so the front's certificate (for localhost) still verifies."""

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


def setup() -> None:
    teardown()
    _sh("ip", "netns", "add", NS)
    _sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    _sh("ip", "link", "set", NS_IF, "netns", NS)
    _sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    _sh("ip", "link", "set", HOST_IF, "up")
    inns = ["ip", "netns", "exec", NS]
    _sh(*inns, "ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF)
    _sh(*inns, "ip", "link", "set", NS_IF, "up")
    _sh(*inns, "ip", "link", "set", "lo", "up")
    _sh("tc", "qdisc", "add", "dev", HOST_IF, "root", "netem", "delay", "20ms", "rate", f"{RATE_MBIT}mbit",
        "limit", "10000")
    _sh(*inns, "tc", "qdisc", "add", "dev", NS_IF, "root", "netem", "delay", "20ms", "rate", f"{RATE_MBIT}mbit",
        "loss", "0.1%", "limit", "10000")
    HOSTS_DIR.mkdir(parents=True, exist_ok=True)
    (HOSTS_DIR / "hosts").write_text(f"127.0.0.1 ns-loopback\n{HOST_IP} localhost\n")


def teardown() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)
    shutil.rmtree(HOSTS_DIR, ignore_errors=True)


class WanOrthanc(Orthanc):
    """Orthanc behind its nginx front, the front also listening on the host end of the veth pair."""

    def _write_configs(self) -> None:
        super()._write_configs()
        conf = self.dir / "nginx.conf"
        line = f"listen 127.0.0.1:{self.https_port} ssl;"
        conf.write_text(conf.read_text().replace(line, f"{line}\n        listen {HOST_IP}:{self.https_port} ssl;"))


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
