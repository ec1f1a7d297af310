"""Acting on a plan: take the run folder's lock, write the plan's files, set aside checkpoints a
killed run left half written, start its command, pass signals on, return its status.

The child runs in its own process group; SIGINT, SIGTERM and SIGHUP sent to the launcher
(Docker and Kubernetes send SIGTERM to PID 1) are forwarded to that whole group, so
`accelerate launch`, torchrun and every rank get them, and the launcher exits with the
child's status (128 + signal number when a signal ended it, as a shell reports it). After
the launcher has passed on a signal, any failure is reported as 128 + that signal: torchrun's
agent turns its own SIGTERM into exit 1 even when every rank checkpointed and stopped cleanly.
However the launcher dies (SIGKILL included), its child gets SIGTERM from the kernel
(recipes/lifetime.py), and the child holds the folder's lock (entrypoint/runlock.py) until it has
stopped: no orphan trains on beside the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from entrypoint import runlock
from entrypoint.plan import Plan
from recipes import atomic, lifetime, runs
from recipes.errors import BadInput

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def check_writable(folder: Path) -> None:
    """BadInput, before anything starts, when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BadInput(
            f"output folder {str(folder)!r} cannot be written by UID {os.getuid()} ({exc.strerror}); give that "
            'user write access (on the host: mkdir -p outputs and chown it, or docker run --user "$(id -u):$(id -g)" '
            "to run as its owner), mount a writable volume there, or set OUTPUTS_DIR / output.dir to a writable folder"
        ) from None


def check_space(folder: Path, needed_gib: float) -> None:
    """BadInput when the disk cannot hold what the run will write (adapter, checkpoints, exports)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # before creating anything
    free_gib = shutil.disk_usage(existing).free / 1024**3
    if free_gib < needed_gib:
        raise BadInput(
            f"output folder {str(folder)!r} has {free_gib:.1f} GiB free but the run will write ~{needed_gib:g} GiB "
            f"(adapter, checkpoints, exports); free space there, point OUTPUTS_DIR at a larger volume, "
            f"or lower output.keep_checkpoints"
        )


# Where the stack writes besides the output folder (the image points them all into its cache volume).
CACHE_VARIABLES = ("HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION")


def check_caches(environ: Mapping[str, str]) -> None:
    """BadInput when a cache folder that exists cannot be written: a cache volume first used by
    another user (its folders are that user's), where training would fail minutes later."""
    for name in CACHE_VARIABLES:
        folder = Path(environ.get(name) or "")
        if not environ.get(name) or not folder.is_dir() or os.access(folder, os.W_OK | os.X_OK):
            continue
        owner = folder.stat().st_uid
        raise BadInput(
            f"cache folder {str(folder)!r} ({name}) cannot be written by UID {os.getuid()}: it belongs to UID "
            f"{owner}, who ran with this cache first; run as that user again (docker run --user {owner}), or give "
            f"this user a cache of its own (a new volume on /workspace/cache)"
        )


def check_output(plan: Plan, environ: Mapping[str, str]) -> None:
    check_space(Path(plan.output_dir), plan.disk_gib)
    check_writable(Path(plan.output_dir))
    check_caches(environ)


def write_files(plan: Plan) -> None:
    for path, text in plan.files.items():
        atomic.write_text(Path(path), text)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def set_aside_incomplete(folder: Path) -> None:
    for moved, to in runs.set_aside_incomplete(folder):
        print(
            f"warning: {moved} is not a whole checkpoint (a run ended while writing it): moved to {to}; "
            f"resuming from the newest whole one",
            file=sys.stderr,
            flush=True,
        )


def execute(plan: Plan, started_at: float) -> int:
    check_output(plan, os.environ)
    if not plan.writes_output:  # generate: reads a run, which may be training meanwhile
        write_files(plan)
        return run(plan, started_at)
    with runlock.held(Path(plan.output_dir), plan.machine_rank, os.environ) as lock:
        write_files(plan)
        set_aside_incomplete(Path(plan.output_dir))
        return run(plan, started_at, lock)


def run(plan: Plan, started_at: float, lock: runlock.Heartbeat | None = None) -> int:
    """Start the plan's command and wait for it; the child keeps the folder's lock open."""
    # The child reports time-to-first-step from the moment the launcher started.
    env = {**os.environ, **plan.env, "ENTRYPOINT_STARTED_AT": repr(started_at)}
    for name in plan.env_unset:
        env.pop(name, None)
    child = subprocess.Popen(
        plan.command,
        env=env,
        start_new_session=True,
        pass_fds=() if lock is None else (lock.fd,),
        preexec_fn=lifetime.die_with_parent,  # only a system call between fork and exec; no thread runs
    )
    if lock is not None:
        lock.start()

    forwarded: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = exit_status(returncode)
    return 128 + forwarded[0] if forwarded and status != 0 else status
