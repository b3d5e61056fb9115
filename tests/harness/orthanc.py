"""The regional PACS stand-in: Debian's Orthanc with the DICOMweb plugin, behind an nginx TLS front door
(mutual TLS), with Orthanc's own HTTP basic auth kept on.

Debian 12's Orthanc 1.10.1 crashes on the first HTTPS connection when its own `SslEnabled` is on, so TLS is
terminated by nginx, as a regional network's front door would do.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests
import urllib3

from .pki import Pki
from .util import free_port, start_process, stop_process_group, tail, wait_until

ORTHANC_BIN = "/usr/sbin/Orthanc"
NGINX_BIN = "/usr/sbin/nginx"
DICOMWEB_PLUGIN_CANDIDATES = [
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
]

USERNAME = "passerelle"
PASSWORD = "s3cret-test-password"


def find_dicomweb_plugin() -> str:
    for c in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(c).exists():
            return c
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    if found:
        return str(found[0])
    raise FileNotFoundError(
        "The Orthanc DICOMweb plugin is not installed; run tests/setup.sh (Debian package orthanc-dicomweb)."
    )


# An HTTP/2 front end as the uplink's documentation asks for (README, `uplink.http2`): each request
# stream may send 1 MiB ahead (http2_body_preread_size is the initial window, client_body_buffer_size
# what nginx keeps granting while it passes the body on unbuffered). nginx's defaults (64 KiB, 16 KiB)
# would cap each stream at a window per round trip.
HTTP2_WINDOWS = """
        http2_body_preread_size 1m;
        client_body_buffer_size 1m;"""

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
    # The combined format, plus the connection each request came on (HTTP/2 streams share one).
    log_format pb '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
                  '"$http_referer" "$http_user_agent" connection=$connection end=$msec took=$request_time';
    access_log {dir}/nginx-access.log pb;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl{http2};
        server_name localhost;{http2_windows}{front_directives}
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {ca_cert};
        ssl_verify_client on;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_read_timeout 300s;
        proxy_send_timeout 300s;
        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_set_header Host $host;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@dataclass
class Orthanc:
    """Orthanc on 127.0.0.1:http_port (plain HTTP, loopback only) behind nginx on 127.0.0.1:https_port."""

    dir: Path
    pki: Pki
    http_port: int = field(default_factory=free_port)
    https_port: int = field(default_factory=free_port)
    # The front door's certificate (default: pki.server_cert for localhost and 127.0.0.1).
    server_cert: Path | None = None
    server_key: Path | None = None
    # Lua scripts Orthanc loads (e.g. a ReceivedInstanceFilter that records every instance received).
    lua_scripts: list[Path] = field(default_factory=list)
    # The front door also speaks HTTP/2 (ALPN), with request-body windows of 1 MiB per stream
    # (HTTP2_WINDOWS); otherwise HTTP/1.1 only.
    http2: bool = False
    # Orthanc replaces an instance it already has when the same SOP Instance UID is stored again (its
    # default keeps the first copy).
    overwrite_instances: bool = False
    # More nginx directives for the front door's server block, e.g. "keepalive_requests 2;".
    front_directives: list[str] = field(default_factory=list)
    orthanc_proc: subprocess.Popen | None = None
    nginx_proc: subprocess.Popen | None = None

    # -- configuration -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The TLS front door, as a client on the regional network sees it."""
        return f"https://localhost:{self.https_port}"

    @property
    def stow_url(self) -> str:
        return f"{self.base_url}/dicom-web/studies"

    @property
    def orthanc_log(self) -> Path:
        return self.dir / "orthanc.log"

    @property
    def nginx_log(self) -> Path:
        return self.dir / "nginx.log"

    def _write_configs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("storage", "index", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / sub).mkdir(exist_ok=True)
        config = {
            "Name": "PassereleTestRegionalPACS",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "StorageCompression": False,
            "Plugins": [find_dicomweb_plugin()],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "SslEnabled": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USERNAME: PASSWORD},
            "DicomServerEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "OverwriteInstances": self.overwrite_instances,
            "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        if self.lua_scripts:
            config["LuaScripts"] = [str(p) for p in self.lua_scripts]
        (self.dir / "orthanc.json").write_text(json.dumps(config, indent=2))
        (self.dir / "nginx.conf").write_text(
            NGINX_CONF.format(
                dir=self.dir,
                port=self.https_port,
                upstream_port=self.http_port,
                server_cert=self.server_cert or self.pki.server_cert,
                server_key=self.server_key or self.pki.server_key,
                ca_cert=self.pki.ca_cert,
                http2=" http2" if self.http2 else "",
                http2_windows=HTTP2_WINDOWS if self.http2 else "",
                front_directives="".join(f"\n        {d}" for d in self.front_directives),
            )
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._write_configs()
        self.start_orthanc()
        self.start_front()

    def start_orthanc(self) -> None:
        assert self.orthanc_proc is None or self.orthanc_proc.poll() is not None, "Orthanc already runs"
        self.orthanc_proc = start_process(
            [ORTHANC_BIN, "--logdir=" + str(self.dir), str(self.dir / "orthanc.json")],
            self.orthanc_log,
            cwd=self.dir,
        )
        try:
            wait_until(self._orthanc_ready, 60, f"Orthanc to answer on 127.0.0.1:{self.http_port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- Orthanc log ---\n{self.log_tail()}") from None

    def stop_orthanc(self) -> None:
        code = stop_process_group(self.orthanc_proc, signal.SIGTERM, timeout=30)
        self.orthanc_proc = None
        assert code in (0, None, -signal.SIGTERM), f"Orthanc exited with {code}\n{self.log_tail()}"

    def start_front(self) -> None:
        assert self.nginx_proc is None or self.nginx_proc.poll() is not None, "nginx already runs"
        self.nginx_proc = start_process(
            [NGINX_BIN, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-g", "daemon off;"],
            self.nginx_log,
            cwd=self.dir,
        )
        try:
            wait_until(self._front_ready, 30, f"nginx TLS front on 127.0.0.1:{self.https_port}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- nginx log ---\n{tail(self.nginx_log)}\n{tail(self.dir / 'nginx-error.log')}") from None

    def stop_front(self) -> None:
        stop_process_group(self.nginx_proc, signal.SIGTERM, timeout=15)
        self.nginx_proc = None

    def stop(self) -> None:
        """Stops both; safe to call more than once and after a failed start."""
        try:
            self.stop_front()
        finally:
            self.stop_orthanc()

    def log_tail(self) -> str:
        logs = sorted(self.dir.glob("Orthanc*.log*")) + [self.orthanc_log]
        return "\n".join(f"--- {p.name} ---\n{tail(p, 40)}" for p in logs if p.exists())

    # -- HTTP ----------------------------------------------------------------------------------------

    def _direct(self, path: str, **kw) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.http_port}{path}", auth=(USERNAME, PASSWORD), timeout=10, **kw)

    def _orthanc_ready(self) -> bool:
        if self.orthanc_proc is not None and self.orthanc_proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with code {self.orthanc_proc.returncode}")
        return self._direct("/system").status_code == 200

    def session(self) -> requests.Session:
        """A requests session that talks to the TLS front with the client certificate and the test CA only."""
        s = requests.Session()
        s.trust_env = False  # ignore REQUESTS_CA_BUNDLE & co: only the test CA is trusted
        s.verify = str(self.pki.ca_cert)
        if self.server_cert is not None:
            # The front door shows a certificate made to be refused (another host name): the harness
            # itself still inspects Orthanc through it, without verification.
            s.verify = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        s.cert = (str(self.pki.client_cert), str(self.pki.client_key))
        s.auth = (USERNAME, PASSWORD)
        return s

    def get(self, path: str, **kw) -> requests.Response:
        with self.session() as s:
            r = s.get(self.base_url + path, timeout=30, **kw)
        r.raise_for_status()
        return r

    def _front_ready(self) -> bool:
        if self.nginx_proc is not None and self.nginx_proc.poll() is not None:
            raise AssertionError(f"nginx exited with code {self.nginx_proc.returncode}")
        return self.get("/system").status_code == 200

    def statistics(self) -> dict:
        return self.get("/statistics").json()

    def count_instances(self) -> int:
        return int(self.statistics()["CountInstances"])

    def count_studies(self) -> int:
        return int(self.statistics()["CountStudies"])

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances").json())

    def sop_instance_uids(self) -> dict[str, str]:
        """Maps SOP Instance UID -> Orthanc instance id, for every stored instance."""
        out: dict[str, str] = {}
        for iid in self.instance_ids():
            tags = self.get(f"/instances/{iid}").json()["MainDicomTags"]
            out[tags["SOPInstanceUID"]] = iid
        return out

    def download(self, instance_id: str) -> bytes:
        """The stored Part-10 file, exactly as Orthanc keeps it."""
        return self.get(f"/instances/{instance_id}/file").content

    def stow(self, part10_files: list[bytes]) -> requests.Response:
        """A direct STOW-RS POST through the TLS front (used to prove the harness without the daemon)."""
        boundary = "passerelle-test-boundary-7d1c3f"
        body = bytearray()
        for f in part10_files:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += f
            body += b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        with self.session() as s:
            return s.post(
                self.stow_url,
                data=bytes(body),
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json",
                },
                timeout=120,
            )


def start_orthanc(d: Path, pki: Pki) -> Orthanc:
    o = Orthanc(dir=d, pki=pki)
    try:
        o.start()
    except BaseException:
        o.stop()
        raise
    return o


def tools_present() -> list[str]:
    """Names of missing programs (empty when the peers can run)."""
    missing = [b for b in (ORTHANC_BIN, NGINX_BIN) if not Path(b).exists()]
    missing += [t for t in ("openssl",) if shutil.which(t) is None]
    return missing
