"""Shared fixtures for the system tests. Everything started here is stopped at the end of each test,
including when the test fails."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import campaign, data, send  # noqa: E402
from harness.gateway import Gateway, gateway_for, passerelled_bin  # noqa: E402
from harness.orthanc import Orthanc, start_orthanc, tools_present  # noqa: E402
from harness.pki import Pki, make_pki  # noqa: E402

CT_SLICES = 200


KEEP_RUNS = 3


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Temporary directories live under /tmp/passerelle-pytest/run-*/ instead of /tmp/pytest-of-root: the
    daemon runs as `passerelle` and must traverse them, and pytest resets /tmp/pytest-of-root to 0700
    whenever another session starts. Each session gets its own run directory (the last 3 are kept, as
    pytest does; one whose session still runs is never removed)."""
    if config.option.basetemp is not None:
        return
    root = Path(tempfile.gettempdir()) / "passerelle-pytest"
    root.mkdir(mode=0o755, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise pytest.UsageError(f"{root} is not a directory owned by this user and writable only by it.")
    os.chmod(root, 0o755)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    os.chmod(run, 0o755)
    (run / "pid").write_text(str(os.getpid()))
    runs = sorted((d for d in root.glob("run-*") if d != run), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in runs[KEEP_RUNS - 1:]:
        if not _alive(old / "pid"):
            shutil.rmtree(old, ignore_errors=True)
    config.option.basetemp = run / "t"


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = tools_present() + [t for t in (send.STORESCU, send.STORESCP, send.ECHOSCU) if not Path(t).exists()]
    if missing:
        raise pytest.UsageError(f"Missing programs {missing}: run tests/setup.sh as root first.")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> data.Study:
    return data.generate_ct_study(tmp_path_factory.mktemp("ct"), slices=CT_SLICES)


@pytest.fixture(scope="session")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> list[data.Instance]:
    files = data.real_world_files(tmp_path_factory.mktemp("real"))
    assert len(files) >= 20, f"only {len(files)} bundled pydicom files usable"
    return files


@pytest.fixture
def orthanc(tmp_path: Path, pki: Pki):
    o = Orthanc(dir=tmp_path / "orthanc", pki=pki)
    try:
        o.start()
        yield o
    finally:
        o.stop()


@pytest.fixture
def orthanc_recording(tmp_path: Path, pki: Pki):
    """The regional PACS (Orthanc behind nginx TLS), recording every instance it receives: yields
    (orthanc, path of the log of received SOP Instance UIDs). For the crash and power-cut campaigns."""
    script, received = campaign.write_received_log_script(tmp_path / "lua")
    o = Orthanc(dir=tmp_path / "orthanc", pki=pki, lua_scripts=[script])
    try:
        o.start()
        yield o, received
    finally:
        o.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, pki: Pki):
    """Factory: make_gateway(orthanc, **overrides) -> a configured (not started) Gateway."""
    made: list[Gateway] = []

    def factory(orthanc: Orthanc, name: str = "gateway", **kw) -> Gateway:
        if not passerelled_bin().exists():
            pytest.fail(f"{passerelled_bin()} does not exist: run `cargo build --release -p passerelled`")
        g = gateway_for(tmp_path / name, orthanc, pki, **kw)
        made.append(g)
        return g

    yield factory
    for g in made:
        g.cleanup()
        print(g.log_excerpt(120))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"passerelled: {passerelled_bin()}", f"storescu: {shutil.which(send.STORESCU) or 'missing'}"]


@pytest.fixture(scope="session")
def storescu_reference(ct_study: data.Study, real_files: list[data.Instance],
                       tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """SOP Instance UID -> the dataset bytes that `send.storescu` puts on the wire for each file (captured
    by a bit-preserving dcmtk storescp)."""
    return send.wire_reference_storescu(ct_study.instances + real_files, tmp_path_factory.mktemp("wire"))


@pytest.fixture(scope="session")
def real_split(real_files: list[data.Instance]) -> tuple[list[data.Instance], list[data.Instance]]:
    """(files sent with storescu, files sent with pynetdicom): every other file that pynetdicom can send
    straight from its path goes to pynetdicom."""
    by_pynetdicom = [i for i in real_files[1::2] if send.pynetdicom_sendable(i)]
    chosen = {i.sop_instance_uid for i in by_pynetdicom}
    by_storescu = [i for i in real_files if i.sop_instance_uid not in chosen]
    assert len(by_pynetdicom) >= 8
    return by_storescu, by_pynetdicom
