"""One job per run folder: a job holds a lock on its output folder for its whole life.

The lock is an exclusive flock on `<output>/.lock` (`.lock-node-N` for machine N of a job of
several: each machine's launcher holds its own). The kernel drops it when every process holding the
file is gone, so a killed job never leaves it behind on a local disk; the launcher hands the file to
its child, so a job whose launcher died still holds it until its last process has ended. The file
says who holds it (host, process, since when, and the kernel it ran under) and the holder touches it
every HEARTBEAT_S seconds. Under one kernel (containers of one machine included) the flock alone
decides. On a shared volume whose locks do not reach across machines, a holder under another kernel
whose file was touched within STALE_S is taken to be alive, and TAKE_OVER_LOCK=1 takes its lock
over on purpose.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from entrypoint.environment import parse_flag
from recipes.errors import BadInput
from recipes.runs import lock_file

HEARTBEAT_S = 30
STALE_S = 120
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # one per running kernel, shared by its containers


def kernel() -> str:
    """This machine's running kernel: containers of one machine share it, and their hostnames differ."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return socket.gethostname()


def holder_of(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    since = holder.get("since", "an unknown time")
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}"


def refuse(path: Path, holder: dict, why: str) -> BadInput:
    return BadInput(
        f"run folder {str(path.parent)!r} is in use: {describe(holder)} holds {path.name} ({why}); wait for that "
        f"job to end, or write this run elsewhere (output.dir, or OUTPUTS_DIR), or if that job is gone for good, "
        f"set TAKE_OVER_LOCK=1 to take the lock over"
    )


def acquire(folder: Path, node_rank: int, environ: Mapping[str, str]) -> int:
    """The open lock file's descriptor, held; BadInput naming the holder when another job holds it."""
    taking_over = parse_flag("TAKE_OVER_LOCK", environ.get("TAKE_OVER_LOCK"))
    path = lock_file(folder, node_rank)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise refuse(path, holder_of(path), "a live lock") from None
    holder = holder_of(path)
    fresh = time.time() - path.stat().st_mtime < STALE_S
    if holder.get("kernel") not in (None, kernel()) and fresh and not taking_over:
        os.close(fd)
        raise refuse(path, holder, f"touched {time.time() - path.stat().st_mtime:.0f} s ago, from another machine")
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since, "kernel": kernel()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, mine.encode(), 0)
    return fd


@contextlib.contextmanager
def held(folder: Path, node_rank: int, environ: Mapping[str, str]) -> Iterator[Heartbeat]:
    """Hold the run folder's lock for the block (and for as long as a child given the descriptor
    lives); the block starts the heartbeat once its child is started (`.start()`: no thread may run
    while the child is forked)."""
    beat = Heartbeat(acquire(folder, node_rank, environ))
    try:
        yield beat
    finally:
        beat.stop.set()
        os.close(beat.fd)


class Heartbeat(threading.Thread):
    """Touches the lock file every HEARTBEAT_S seconds, so another machine can tell it is held."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.fd)
