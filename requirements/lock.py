"""The two locks, the one command that rewrites them, and the check of what they promise.

    requirements/image.in   -> image.lock    what the image installs (Linux x86-64, Python 3.12, CUDA)
    requirements/cpu-dev.in -> cpu-dev.lock  the CPU development and CI environment (Python 3.11)

Each lock pins every package, dependencies included, and both are installed with --no-deps, so
nothing is resolved at install time. Each records the moment it was resolved (`# resolved-at:`).
`check` resolves the input again with the package index frozen at that moment (uv's
--exclude-newer) and demands the same pins: a release published later cannot change the verdict,
while a lock that no longer satisfies its input (a pin changed in the .in file, a package added
or dropped) fails it, naming each difference.

    python requirements/lock.py write [image|cpu-dev ...]   # `make lock`: resolve now, record the moment
    python requirements/lock.py check [image|cpu-dev ...]   # what the tests run; asks the package index

Run `make lock` after editing an .in file, or to take newer releases on purpose; commit the .in
and the .lock together.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESOLVED_AT = re.compile(r"^# resolved-at: (\S+)", re.MULTILINE)
# The CPU build of torch that the development environment uses lies in this folder on the
# project's machines (pip's find-links); PyPI's Linux torch is a CUDA build of several GB.
TORCH_CPU_WHEELS = "/opt/wheels"


@dataclass(frozen=True)
class Lock:
    source: Path  # the .in file: what we ask for
    target: Path  # the .lock file: every package, pinned
    python_version: str
    platform: str = "x86_64-manylinux_2_28"
    index_args: tuple[str, ...] = field(default=())  # where uv looks (default: PyPI)

    @property
    def name(self) -> str:
        return self.target.stem


LOCKS = {
    "image": Lock(HERE / "image.in", HERE / "image.lock", "3.12"),
    "cpu-dev": Lock(HERE / "cpu-dev.in", HERE / "cpu-dev.lock", "3.11", index_args=("--find-links", TORCH_CPU_WHEELS)),
}


class LockError(Exception):
    """A lock that cannot be checked or written: the message says why and what to do."""


def pins(path: Path) -> dict[str, str]:
    """Normalised name -> version of every `name==version` line (comments ignored)."""
    result = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            result[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return result


def resolved_at(lock: Lock) -> str:
    found = RESOLVED_AT.search(lock.target.read_text())
    if not found:
        raise LockError(f"{lock.target} records no '# resolved-at:' moment; rewrite it with `make lock`")
    return found.group(1)


def uv() -> str:
    """uv from the environment running this (the dev lock pins it), else from PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise LockError("uv is not installed; run `make test` once to build .venv, or pip install uv")
    return found


def resolve(lock: Lock, at: str, dest: Path) -> None:
    """Resolve lock.source as the index stood at `at` into dest (uv's own format, no header)."""
    command = [
        uv(),
        "pip",
        "compile",
        str(lock.source),
        "--python-version",
        lock.python_version,
        "--python-platform",
        lock.platform,
        "--exclude-newer",
        at,
        # Resolve for the target version with the Python at hand: left alone, uv would try to
        # download an interpreter of that version from GitHub, which these machines cannot reach.
        "--python",
        sys.executable,
        "--no-python-downloads",
        "--no-header",
        "--quiet",
        *lock.index_args,
        "--output-file",
        str(dest),
    ]
    # uv names the input in its "# via -r ..." notes as given: give it relative to the repository.
    done = subprocess.run(command, cwd=HERE.parent, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise LockError(f"uv could not resolve {lock.source.name} as of {at}:\n{done.stderr.strip()[-3000:]}")


def satisfies(locked: str | None, asked: str) -> bool:
    """`==asked` admits `locked`: equal, or equal but for a local label (2.13.0 admits 2.13.0+cpu)."""
    return locked is not None and (locked == asked or ("+" not in asked and locked.split("+")[0] == asked))


def differences(lock: Lock) -> list[str]:
    """What is wrong with the lock, one line each; empty when it keeps its promise."""
    locked = pins(lock.target)
    problems = [
        f"{name}: {lock.source.name} asks for =={version}, {lock.target.name} pins {locked.get(name, 'nothing')}"
        for name, version in pins(lock.source).items()
        if not satisfies(locked.get(name), version)
    ]
    at = resolved_at(lock)
    with tempfile.TemporaryDirectory() as tmp:
        fresh_file = Path(tmp) / lock.target.name
        resolve(lock, at, fresh_file)
        fresh = pins(fresh_file)
    for name in sorted(set(locked) | set(fresh)):
        if locked.get(name) != fresh.get(name):
            problems.append(
                f"{name}: {lock.target.name} pins {locked.get(name, 'nothing')}, "
                f"but {lock.source.name} resolves to {fresh.get(name, 'nothing')} as of {at}"
            )
    return problems


def write(lock: Lock, at: str | None = None) -> str:
    """Resolve now (or as of `at`) and replace the lock; returns the moment recorded."""
    at = at or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fd, tmp = tempfile.mkstemp(dir=lock.target.parent, prefix=f".{lock.target.name}.")
    os.close(fd)
    try:
        resolve(lock, at, Path(tmp))
        header = (
            f"# Every package of {lock.source.name}, dependencies included, for Python {lock.python_version} "
            f"on {lock.platform}.\n"
            f"# Written by `make lock` (requirements/lock.py); `make test` checks it. Install with --no-deps.\n"
            f"# resolved-at: {at}\n"
        )
        Path(tmp).write_text(header + Path(tmp).read_text())
        os.replace(tmp, lock.target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return at


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("locks", nargs="*", metavar="NAME", help=f"{', '.join(LOCKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.locks if name not in LOCKS]
    if unknown:
        print(f"error: no lock named {', '.join(unknown)}; the locks are {', '.join(LOCKS)}", file=sys.stderr)
        return 2
    failed = False
    for name in args.locks or list(LOCKS):
        lock = LOCKS[name]
        try:
            if args.action == "write":
                print(f"{lock.target.relative_to(HERE.parent)}: resolved as of {write(lock)}")
                continue
            problems = differences(lock)
        except LockError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"{lock.target.name}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            print(f"{lock.target.name}: keeps its promise ({len(pins(lock.target))} pins, as of {resolved_at(lock)})")
    if failed:
        print("error: a lock does not match its input; run `make lock` and commit both files", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
