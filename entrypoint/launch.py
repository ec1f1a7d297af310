"""Acting on a plan: write its files, start its command, pass signals on, return its status.

The child runs in its own process group; SIGINT, SIGTERM and SIGHUP sent to the launcher
(Docker and Kubernetes send SIGTERM to PID 1) are forwarded to that whole group, so
`accelerate launch`, torchrun and every rank get them, and the launcher exits with the
child's status (128 + signal number when a signal ended it, as a shell reports it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from types import FrameType

from entrypoint.plan import Plan
from recipes.errors import BadInput

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path) -> None:
    """BadInput, before anything starts, when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise BadInput(
            f"output folder {str(folder)!r} cannot be written ({exc.strerror}); mount a writable "
            f"volume there or set OUTPUTS_DIR / output.dir to a writable folder"
        ) from None


def write_files(plan: Plan) -> None:
    check_writable(Path(plan.output_dir))
    for path, text in plan.files.items():
        write_atomically(Path(path), text)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def execute(plan: Plan, started_at: float) -> int:
    write_files(plan)
    # The child reports time-to-first-step from the moment the launcher started.
    env = {**os.environ, **plan.env, "ENTRYPOINT_STARTED_AT": repr(started_at)}
    for name in plan.env_unset:
        env.pop(name, None)
    child = subprocess.Popen(plan.command, env=env, start_new_session=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_status(returncode)
