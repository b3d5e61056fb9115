"""The daemon under test: writes a passerelled config, starts/stops/kills it, and reads its status."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .orthanc import PASSWORD, USERNAME, Orthanc
from .pki import Pki
from .send import echoscu
from .util import free_port, run, start_process, tail, wait_until

REPO = Path(__file__).resolve().parents[2]
AE_TITLE = "PASSERELLE"
# The account the daemon switches to when started as root (daemon.user's default), as on the box.
DAEMON_USER = "passerelle"


def ensure_daemon_user(name: str = DAEMON_USER) -> pwd.struct_passwd:
    """The daemon's system account, created as tests/setup.sh does if it is missing (tests run as root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], timeout=30)
        return pwd.getpwnam(name)


def make_traversable(path: Path) -> None:
    """Lets every user traverse (not list) each directory from `path` up to /: pytest makes its temporary
    directories 0700, and the daemon runs as `passerelle`."""
    for d in [path, *path.parents]:
        try:
            st = d.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def share_with_daemon(path: Path, user: pwd.struct_passwd) -> None:
    """Makes a file the daemon reads (CA, client certificate and key) readable by `user`: its group
    becomes the user's group when others may not read it (a private key is 0600)."""
    make_traversable(path.parent)
    st = path.stat()
    if not st.st_mode & stat.S_IROTH and st.st_uid != user.pw_uid:
        if st.st_gid != user.pw_gid:
            os.chown(path, -1, user.pw_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IRGRP)


def give_to_daemon(path: Path, user: pwd.struct_passwd) -> None:
    """Creates `path` if needed and gives it, and everything in it the test process wrote as root, to
    `user` (files vanishing meanwhile under a running daemon are fine)."""
    make_traversable(path.parent)
    path.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
                if st.st_uid != user.pw_uid or st.st_gid != user.pw_gid:
                    os.lchown(p, user.pw_uid, user.pw_gid)
            except FileNotFoundError:
                pass


def passerelled_bin() -> Path:
    """`$PASSERELLED` if set, else the release build in this repository."""
    return Path(os.environ.get("PASSERELLED", REPO / "target" / "release" / "passerelled"))


def toml_str(s: str | Path) -> str:
    return json.dumps(str(s))  # a JSON string is a valid TOML basic string


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return toml_str(str(v))


@dataclass
class Gateway:
    dir: Path
    stow_url: str
    ca_file: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str = ""
    password: str = ""
    ae_title: str = AE_TITLE
    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    extra_uplink: dict[str, object] = field(default_factory=dict)
    extra_dicom: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.dir / "passerelled.toml"

    @property
    def spool_dir(self) -> Path:
        return self.dir / "spool"

    @property
    def log_path(self) -> Path:
        return self.dir / "passerelled.log"

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        uplink = {
            "retry_base_secs": 1,
            "retry_max_secs": 4,
            "batch_max_instances": 50,
            **self.extra_uplink,
        }
        uplink = {k: v for k, v in uplink.items() if v is not None}  # None: the shipped default
        lines = [
            "[dicom]",
            f"ae_title = {toml_str(self.ae_title)}",
            f'listen = "127.0.0.1:{self.port}"',
            f"allowed_calling_ae_titles = [{', '.join(toml_str(t) for t in self.allowed_calling_ae_titles)}]",
            *[f"{k} = {toml_value(v)}" for k, v in self.extra_dicom.items()],
            "",
            "[spool]",
            f"dir = {toml_str(self.spool_dir)}",
            "min_free_mb = 64",
            "",
            "[uplink]",
            f"stow_url = {toml_str(self.stow_url)}",
            f"ca_file = {toml_str(self.ca_file)}",
        ]
        if self.client_cert and self.client_key:
            lines += [f"client_cert = {toml_str(self.client_cert)}", f"client_key = {toml_str(self.client_key)}"]
        if self.username:
            lines += [f"username = {toml_str(self.username)}", f"password = {toml_str(self.password)}"]
        for k, v in uplink.items():
            lines.append(f"{k} = {toml_value(v)}")
        lines += ["", "[admin]", f'listen = "127.0.0.1:{self.admin_port}"', ""]
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def prepare_for_daemon(self) -> None:
        """What a box's installer does: the spool belongs to the daemon user, and the files the daemon reads
        (and the notification socket it writes to) are reachable by it. The daemon starts as root and
        switches to that user; the config stays root's (it is read before the switch)."""
        if os.geteuid() != 0:
            return
        user = ensure_daemon_user()
        cfg = tomllib.loads(self.config_path.read_text())
        give_to_daemon(Path(cfg.get("spool", {}).get("dir", self.spool_dir)), user)
        uplink = cfg.get("uplink", {})
        for key in ("ca_file", "client_cert", "client_key"):
            if uplink.get(key) and Path(uplink[key]).is_file():
                share_with_daemon(Path(uplink[key]), user)
        notify = self._env().get("NOTIFY_SOCKET", "")
        if notify.startswith("/") and Path(notify).exists():
            make_traversable(Path(notify).parent)
            os.chmod(notify, 0o777)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        env.setdefault("RUST_BACKTRACE", "1")
        env.pop("NOTIFY_SOCKET", None)  # not under systemd
        env.pop("JOURNAL_STREAM", None)
        env.update(self.env)
        return env

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, wait_ready: bool = True) -> None:
        binary = passerelled_bin()
        if not binary.exists():
            raise AssertionError(f"{binary} does not exist: run `cargo build --release -p passerelled` first")
        assert not self.running, "passerelled already runs"
        if not self.config_path.exists():
            self.write_config()
        self.prepare_for_daemon()
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start #{self.starts}: {binary} --config {self.config_path} =====\n")
        self.proc = start_process([str(binary), "--config", str(self.config_path)], self.log_path, env=self._env())
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"passerelled exited with code {self.proc.returncode} during start-up")
            return echoscu(self.port, self.ae_title).returncode == 0

        try:
            wait_until(ready, timeout, f"passerelled to answer C-ECHO on 127.0.0.1:{self.port}", interval=0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_excerpt()}") from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, and return the exit code (the caller asserts it is 0)."""
        assert self.proc is not None, "passerelled was not started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(
                    f"passerelled did not exit within {timeout:.0f} s of SIGTERM (killed)\n{self.log_excerpt()}"
                ) from None
        code = self.proc.returncode
        self.proc = None
        return code

    def stop_ok(self, timeout: float = 60) -> None:
        code = self.stop(timeout)
        assert code == 0, f"passerelled exited with code {code} after SIGTERM, expected 0\n{self.log_excerpt()}"

    def kill(self) -> None:
        """SIGKILL: a crash or power cut, as far as the process is concerned."""
        assert self.proc is not None, "passerelled was not started"
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        """Ends the daemon whatever its state (fixture finalizer)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_excerpt(self, lines: int = 80) -> str:
        return f"--- passerelled log ({self.log_path}), last {lines} lines ---\n{tail(self.log_path, lines)}"

    # -- commands ------------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        if self.config_path.exists():
            self.prepare_for_daemon()  # rebuild-index or status after the test damaged the spool as root
        return run([str(passerelled_bin()), *args], timeout=timeout, check=check, env=self._env())

    def status(self) -> dict:
        cp = self.cli("status", "--config", str(self.config_path), "--json")
        if cp.returncode != 0:
            raise AssertionError(f"passerelled status failed ({cp.returncode}): {cp.stderr}\n{cp.stdout}")
        return json.loads(cp.stdout)

    def status_text(self) -> str:
        cp = self.cli("status", "--config", str(self.config_path))
        return cp.stdout + cp.stderr


def gateway_for(d: Path, orthanc: Orthanc, pki: Pki, **kw) -> Gateway:
    """A gateway configured to deliver to `orthanc` through its TLS front with mutual TLS and basic auth."""
    kw.setdefault("ca_file", pki.ca_cert)
    kw.setdefault("client_cert", pki.client_cert)
    kw.setdefault("client_key", pki.client_key)
    g = Gateway(
        dir=d,
        stow_url=orthanc.stow_url,
        username=USERNAME,
        password=PASSWORD,
        **kw,
    )
    g.write_config()
    return g
