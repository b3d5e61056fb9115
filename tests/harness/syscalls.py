"""What a power cut needs, checked at the system-call level: strace attached to the running daemon
records the order in which fsyncs, renames and socket writes complete, so a test can prove that every
C-STORE success response was written only after the instance's file, its directory entry and its
queue row had been forced to disk.

strace prints a system call either whole (`12 fsync(7</x>) = 0`), or in two lines when another thread's
call interleaves (`12 fsync(7</x> <unfinished ...>` ... `12 <... fsync resumed>) = 0`). A line's
position is the order of events: a whole line or an `unfinished` line marks the call's entry (nothing
of another thread happened in between), a whole line or a `resumed` line marks its return.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .util import wait_until

TRACED = "openat,fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,sendmsg"

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_WHOLE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_UNFINISHED = re.compile(r"^(\w+)\((.*)\s+<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*?)\)?\s+=\s+(-?\d+|\?)")


@dataclass
class Call:
    tid: str
    name: str
    args: str
    ret: str
    entry: int  # position of the entry in the trace
    exit: int  # position of the return in the trace


def parse(text: str) -> list[Call]:
    """The completed system calls of an `strace -f -yy -x` trace, in order of entry."""
    calls: list[Call] = []
    pending: dict[str, tuple[str, str, int]] = {}
    for pos, raw in enumerate(text.splitlines()):
        m = _LINE.match(raw.strip())
        if not m:
            continue
        pid, rest = m.groups()
        if (w := _WHOLE.match(rest)) is not None:
            calls.append(Call(pid, w.group(1), w.group(2), w.group(3), pos, pos))
        elif (u := _UNFINISHED.match(rest)) is not None:
            pending[pid] = (u.group(1), u.group(2), pos)
        elif (r := _RESUMED.match(rest)) is not None and pid in pending:
            name, args, entry = pending.pop(pid)
            if name == r.group(1):
                calls.append(Call(pid, name, args + r.group(2), r.group(3), entry, pos))
    calls.sort(key=lambda c: c.entry)
    return calls


class Tracer:
    """`strace -f -p <pid>` on a running process (all its threads, and those it starts later)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.err = out.with_suffix(".stderr")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["strace", "-f", "-p", str(pid), "-o", str(out), "-yy", "-x", "-s", "8", "-e", f"trace={TRACED}",
                 "-e", "signal=none"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        # "Process N attached with M threads" comes once all of them are.
        wait_until(
            lambda: " attached" in self.err.read_text(errors="replace"),
            20,
            f"strace to attach to the threads of process {pid}",
            interval=0.05,
        )

    def stop(self) -> str:
        """Detaches (the traced process goes on) and returns the trace."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        return self.out.read_text(errors="replace")


def acknowledgement_order_problems(
    calls: list[Call], dicom_port: int, spool_dir: Path
) -> tuple[int, list[str], int]:
    """(number of C-STORE/C-ECHO P-DATA responses written, what each lacked, how many were written
    into a pre-created file made within the trace). Before every P-DATA-TF written on a DICOM
    connection, and since the previous one, one of these must have completed:

    - through a temporary file: fsync of a file in spool/tmp, its rename into spool/objects, then both
      an fsync of an objects/ subdirectory and an fsync (or fdatasync) of spool.db-wal (the queue row's
      commit), the last two by the thread that renamed (the uplink commits to the same database from
      other tasks);
    - through a pre-created file (`objects/<xx>/<32 hex>.dcm.zst`, the spool's pool): an fdatasync of
      that file; its name must have been made durable before the response (an fsync of its directory
      after its creation). The row is committed without a WAL sync: the file is the durable record
      (recovery takes whole pre-created files back in; spool unit tests and the power-cut test cover
      that). Files created before strace attached cannot be followed to their creation: they are
      accepted, and the count of those that were is returned so that a test can require some.
    """
    spool = str(spool_dir)
    sock = f"TCP:[127.0.0.1:{dicom_port}->"
    pooled_name = re.compile(re.escape(f"{spool}/objects/") + r"([0-9a-f]{2})/[0-9a-f]{32}\.dcm\.zst")
    problems: list[str] = []
    responses = [
        c for c in calls
        if c.name in ("write", "writev", "sendto", "sendmsg") and sock in c.args and '"\\x04\\x00' in c.args
    ]
    followed = 0
    previous = -1
    for k, rsp in enumerate(responses):
        window = [c for c in calls if previous < c.exit < rsp.entry and c.ret == "0"]
        previous = rsp.entry
        pooled_sync = next(
            (c for c in window if c.name in ("fsync", "fdatasync") and pooled_name.search(c.args)), None
        )
        if pooled_sync is not None:
            m = pooled_name.search(pooled_sync.args)
            assert m is not None
            path, fan = m.group(0), m.group(1)
            created = next(
                (c for c in calls if c.name == "openat" and path in c.args and "O_CREAT" in c.args
                 and c.exit < pooled_sync.entry),
                None,
            )
            if created is None:
                continue  # made before strace attached
            followed += 1
            dir_synced = any(
                c.name == "fsync" and c.ret == "0" and created.exit < c.exit < rsp.entry
                and re.search(re.escape(f"{spool}/objects/{fan}") + ">", c.args)
                for c in calls
            )
            if not dir_synced:
                problems.append(f"response {k}: the pre-created file {path} was used before its directory was fsynced")
            continue
        file_sync = next(
            (c for c in window if c.name in ("fsync", "fdatasync") and f"{spool}/tmp/" in c.args), None
        )
        renamed = file_sync and next(
            (c for c in window if c.name.startswith("rename") and c.exit > file_sync.exit
             and f"{spool}/objects/" in c.args), None,
        )
        if file_sync is None or renamed is None:
            problems.append(
                f"response {k}: neither an fdatasync of a pre-created file nor an fsync of a spool/tmp file "
                "followed by a rename into objects/"
            )
            continue
        dir_sync = any(
            c.name == "fsync" and c.tid == renamed.tid and c.exit > renamed.exit and re.search(re.escape(f"{spool}/objects/") + r"[0-9a-f]{2}>", c.args)
            for c in window
        )
        row_sync = any(
            c.name in ("fsync", "fdatasync") and c.tid == renamed.tid and c.exit > renamed.exit
            and f"{spool}/spool.db-wal>" in c.args
            for c in window
        )
        if not dir_sync:
            problems.append(f"response {k}: the objects/ directory was not fsynced after the rename")
        if not row_sync:
            problems.append(f"response {k}: spool.db-wal was not synced after the rename (row commit)")
    return len(responses), problems, followed
