"""The daemon never runs as root (issue 3, "Privileges").

Started as root, passerelled binds its DICOM port (104 here, a privileged port, in a network namespace the
test creates so that 104 is free), then switches to `daemon.user` (`passerelle`) for good before it touches
the spool: /proc shows no root uid or gid and no capability, and every spool file is the user's. Started
the way the shipped systemd unit starts it (as `passerelle` with only the ambient CAP_NET_BIND_SERVICE), it
binds 104 too, then gives the capability up (/proc shows none left); without the capability it stops with a sentence naming the port and the capability. A
missing daemon user, or root as daemon user, is refused. The unit file holds the privilege settings and
passes `systemd-analyze verify`.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from harness import data
from harness.gateway import (
    DAEMON_USER,
    REPO,
    Gateway,
    ensure_daemon_user,
    make_traversable,
    passerelled_bin,
    share_with_daemon,
)
from harness.pki import Pki
from harness.send import ECHOSCU, STORESCU
from harness.util import free_port, run, start_process, tail, wait_until

UNIT = REPO / "firmware" / "passerelled" / "passerelled.service"
DICOM_PORT = 104
CAP_NET_BIND_SERVICE = 1 << 10

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts the daemon as root, as CI runs the tests")


@pytest.fixture
def netns():
    """A fresh network namespace with only `lo` (up): port 104 is free in it whatever the host runs."""
    name = f"passerelle-priv-{uuid.uuid4().hex[:8]}"
    run(["ip", "netns", "add", name], timeout=30)
    try:
        run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


@pytest.fixture
def daemon_user() -> pwd.struct_passwd:
    return ensure_daemon_user()


@pytest.fixture
def small_study(tmp_path: Path) -> data.Study:
    return data.generate_ct_study(tmp_path / "ct", slices=3, size=64)


class Daemon:
    """One passerelled process started with an explicit command line (inside the namespace)."""

    def __init__(self, gw: Gateway, argv: list[str]) -> None:
        self.gw = gw
        self.proc = start_process(argv, gw.log_path, env=gw._env())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def gateway(tmp_path: Path, pki: Pki, daemon_user: pwd.struct_passwd, port: int = DICOM_PORT,
            user: str | None = None) -> Gateway:
    """A gateway whose directory belongs to the daemon user, so that the daemon creates its spool itself
    (the harness's usual start pre-creates it). The uplink goes nowhere: a C-STORE is acknowledged once
    the instance is in the spool."""
    gw = Gateway(dir=tmp_path / "gw", stow_url="https://127.0.0.1:9/dicom-web/studies", ca_file=pki.ca_cert,
                 port=port)
    gw.write_config()
    if user is not None:
        with open(gw.config_path, "a") as f:
            f.write(f'[daemon]\nuser = "{user}"\n')
    share_with_daemon(pki.ca_cert, daemon_user)
    make_traversable(gw.dir)
    os.chown(gw.dir, daemon_user.pw_uid, daemon_user.pw_gid)
    return gw


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def echo(ns: str, port: int = DICOM_PORT) -> bool:
    return run(in_ns(ns, ECHOSCU, "-aec", "PASSERELLE", "-to", "5", "-ta", "5", "-td", "5", "127.0.0.1",
                     str(port)), timeout=30, check=False).returncode == 0


def wait_serving(d: Daemon, ns: str) -> None:
    def ok() -> bool:
        if d.proc.poll() is not None:
            raise AssertionError(f"passerelled exited with code {d.proc.returncode}\n{d.gw.log_excerpt()}")
        return echo(ns)

    wait_until(ok, 30, f"passerelled to answer C-ECHO on port {DICOM_PORT} in {ns}", interval=0.3)


def store(ns: str, study: data.Study) -> None:
    cp = run(in_ns(ns, STORESCU, "-v", "-aec", "PASSERELLE", "127.0.0.1", str(DICOM_PORT),
                   *[str(i.path) for i in study.instances]), timeout=120, check=False)
    out = cp.stdout + cp.stderr
    ok = len(re.findall(r"Received Store Response \(Success\)", out))
    assert cp.returncode == 0 and ok == len(study.instances), f"{ok} of {len(study.instances)} stored:\n{out[-3000:]}"


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def foreign_files(spool: Path, user: pwd.struct_passwd) -> list[str]:
    """Everything in the spool that does not belong to the daemon user."""
    bad = []
    for root, dirs, files in os.walk(spool):
        for name in [".", *dirs, *files]:
            st = os.lstat(os.path.join(root, name))
            if st.st_uid != user.pw_uid or st.st_gid != user.pw_gid:
                bad.append(f"{os.path.join(root, name)} ({st.st_uid}:{st.st_gid})")
    return bad


def cli_as_root(gw: Gateway, *args: str) -> subprocess.CompletedProcess:
    return run([str(passerelled_bin()), *args, "--config", str(gw.config_path)], timeout=60, check=False,
               env=gw._env())


def test_started_as_root_it_binds_104_then_runs_as_passerelle_without_capabilities(
    netns: str, daemon_user: pwd.struct_passwd, pki: Pki, small_study: data.Study, tmp_path: Path
) -> None:
    gw = gateway(tmp_path, pki, daemon_user)
    d = Daemon(gw, in_ns(netns, str(passerelled_bin()), "--config", str(gw.config_path)))
    try:
        wait_serving(d, netns)
        store(netns, small_study)

        st = proc_status(d.proc.pid)
        uids, gids = st["Uid"].split(), st["Gid"].split()
        assert uids == [str(daemon_user.pw_uid)] * 4, f"Uid (real, effective, saved, fs): {st['Uid']}"
        assert gids == [str(daemon_user.pw_gid)] * 4, f"Gid (real, effective, saved, fs): {st['Gid']}"
        assert "0" not in st["Groups"].split(), f"still in group root: {st['Groups']}"
        for cap in ("CapEff", "CapPrm", "CapAmb"):
            assert int(st[cap], 16) == 0, f"{cap} is {st[cap]}"
        assert st.get("NoNewPrivs") == "1", st.get("NoNewPrivs")
        assert "Switched from root to the daemon user" in tail(gw.log_path, 200)

        assert (gw.spool_dir / "spool.db").is_file()
        assert list((gw.spool_dir / "objects").glob("*/*.dcm.zst")), "no instance file in the spool"
        assert foreign_files(gw.spool_dir, daemon_user) == []

        # The operator commands, run as root beside the running daemon, leave no root-owned file.
        cp = cli_as_root(gw, "status", "--json")
        assert cp.returncode == 0, cp
        counts = json.loads(cp.stdout)
        assert counts["queued"] + counts["uploading"] == len(small_study.instances), counts  # no PACS answers
        assert foreign_files(gw.spool_dir, daemon_user) == []
    finally:
        code = d.stop()
    assert code == 0, f"exit code {code} after SIGTERM\n{gw.log_excerpt()}"

    for args in (["requeue"], ["status"], ["rebuild-index"]):
        cp = cli_as_root(gw, *args)
        assert cp.returncode == 0, f"passerelled {args[0]} as root failed: {cp}"
        assert foreign_files(gw.spool_dir, daemon_user) == [], f"after {args[0]} as root"


def test_started_as_passerelle_with_the_ambient_capability_it_binds_104_and_without_it_says_why(
    netns: str, daemon_user: pwd.struct_passwd, pki: Pki, small_study: data.Study, tmp_path: Path
) -> None:
    gw = gateway(tmp_path, pki, daemon_user)
    as_user = ["setpriv", "--reuid", DAEMON_USER, "--regid", DAEMON_USER, "--init-groups"]
    daemon = [str(passerelled_bin()), "--config", str(gw.config_path)]

    # Without the capability: a privileged port cannot be bound, and the message says which and why.
    cp = run(in_ns(netns, *as_user, "--", *daemon), timeout=30, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    assert "104" in out and "CAP_NET_BIND_SERVICE" in out, out
    assert not gw.spool_dir.exists(), "the daemon touched the spool although it could not listen"

    # As the unit does it: the user, and CAP_NET_BIND_SERVICE as an ambient capability.
    caps = ["--inh-caps", "+net_bind_service", "--ambient-caps", "+net_bind_service"]
    d = Daemon(gw, in_ns(netns, *as_user, *caps, "--", *daemon))
    try:
        wait_serving(d, netns)
        store(netns, small_study)
        st = proc_status(d.proc.pid)
        assert st["Uid"].split() == [str(daemon_user.pw_uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(daemon_user.pw_gid)] * 4, st["Gid"]
        # The capability served to bind the port; the daemon gave it up once the port was bound.
        for key in ("CapAmb", "CapEff", "CapPrm", "CapInh"):
            assert int(st[key], 16) == 0, (key, st[key])
        assert foreign_files(gw.spool_dir, daemon_user) == []
    finally:
        code = d.stop()
    assert code == 0, f"exit code {code} after SIGTERM\n{gw.log_excerpt()}"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("nosuchuser-pass", ["nosuchuser-pass", "does not exist", "useradd"]),
        ("root", ["daemon.user", "never runs as root"]),
    ],
)
def test_a_missing_or_root_daemon_user_is_refused(
    user: str, expected: list[str], daemon_user: pwd.struct_passwd, pki: Pki, tmp_path: Path
) -> None:
    gw = gateway(tmp_path, pki, daemon_user, port=free_port(), user=user)
    cp = run([str(passerelled_bin()), "--config", str(gw.config_path)], timeout=30, check=False, env=gw._env())
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    for words in expected:
        assert words in out, f"{words!r} not in:\n{out}"
    assert not gw.spool_dir.exists(), "the daemon created its spool as root before refusing"
    # The operator commands refuse the same way instead of opening the spool as root.
    cp = cli_as_root(gw, "status")
    assert cp.returncode != 0 and expected[-1] in cp.stdout + cp.stderr, cp


def test_a_spool_the_daemon_user_cannot_write_is_named_with_the_chown_that_fixes_it(
    daemon_user: pwd.struct_passwd, pki: Pki, tmp_path: Path
) -> None:
    gw = gateway(tmp_path, pki, daemon_user, port=free_port())
    gw.spool_dir.mkdir(mode=0o755)  # root's, as a careless installer leaves it
    cp = run([str(passerelled_bin()), "--config", str(gw.config_path)], timeout=30, check=False, env=gw._env())
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out
    group = grp.getgrgid(daemon_user.pw_gid).gr_name
    fix = f"chown -R {DAEMON_USER}:{group} {gw.spool_dir}"
    assert str(gw.spool_dir) in out and fix in out, out
    assert list(gw.spool_dir.iterdir()) == []

    run(fix.split(), timeout=30)  # the fix it names works
    d = Daemon(gw, [str(passerelled_bin()), "--config", str(gw.config_path)])
    try:
        wait_until(lambda: (gw.spool_dir / "spool.db").exists() or d.proc.poll() is not None, 30,
                   "the spool database")
        assert d.proc.poll() is None, gw.log_excerpt()
    finally:
        assert d.stop() == 0, gw.log_excerpt()


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value, a key may repeat (values accumulate)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"not a unit file line: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_shipped_systemd_unit_runs_the_daemon_unprivileged(tmp_path: Path) -> None:
    unit = unit_settings(UNIT.read_text())
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["User"] == DAEMON_USER and svc["Group"] == DAEMON_USER
    assert svc["AmbientCapabilities"].split() == ["CAP_NET_BIND_SERVICE"]
    assert svc["CapabilityBoundingSet"].split() == ["CAP_NET_BIND_SERVICE"]
    assert svc["NoNewPrivileges"] == "yes"
    assert int(svc["LimitNOFILE"]) >= 2048
    assert svc["ProtectSystem"] == "strict"
    assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "@system-service" in unit["Service"]["SystemCallFilter"]
    assert svc["Restart"] == "on-failure"
    # The writable path is the spool's default directory (README.md's configuration table).
    readme_default = re.search(r"\| `spool\.dir` \| `\"([^\"]+)\"` \|", (REPO / "README.md").read_text())
    assert readme_default, "README.md documents no spool.dir default"
    assert svc["ReadWritePaths"].lstrip("-") == readme_default.group(1)

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # Verify a copy whose binary path exists here (verify checks that ExecStart's program does).
    copy = tmp_path / "passerelled.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/passerelled", str(passerelled_bin())))
    cp = run([analyze, "verify", "--man=no", str(copy)], timeout=60, check=False)
    assert cp.returncode == 0, f"systemd-analyze verify failed:\n{cp.stdout}\n{cp.stderr}"
    problems = [line for line in cp.stderr.splitlines() if "passerelled.service" in line]
    assert problems == [], "\n".join(problems)
