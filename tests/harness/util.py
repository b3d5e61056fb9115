"""Small shared helpers: free ports, polling with deadlines, process groups."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it), never the same twice in one
    test run (so two servers of one test cannot be handed the same port)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("No free TCP port found on 127.0.0.1")


class Timeout(AssertionError):
    pass


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """Polls `condition` until it returns a truthy value (which is returned) or `timeout` seconds pass.

    Exceptions raised by `condition` count as "not yet" and the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_exc: BaseException | None = None
    while True:
        try:
            value = condition()
            last_exc = None
            if value:
                return value
            last_value = value
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f"last exception: {last_exc!r}" if last_exc else f"last value: {last_value!r}"
            raise Timeout(f"Timed out after {timeout:.0f} s waiting for {what} ({detail})")
        time.sleep(interval)


def start_process(
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Starts `argv` in its own process group with stdout+stderr appended to `log_path`."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log.close()


def stop_process_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
    """Sends `sig` to the process group of `proc`, waits, then SIGKILLs the group if still alive.

    Returns the exit code (negative for a signal), or None when there was no process.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # Leftover children of the group (e.g. nginx workers) get killed too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def run(argv: list[str], timeout: float = 300, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Runs a command, capturing text output; on failure the error shows the command and its output."""
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise AssertionError(
            f"Command failed with exit code {cp.returncode}: {' '.join(map(str, argv))}\n"
            f"--- stdout ---\n{cp.stdout[-4000:]}\n--- stderr ---\n{cp.stderr[-4000:]}"
        )
    return cp
