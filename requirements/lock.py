"""The locks, the one command that rewrites them, and the check of what they promise.

    requirements/image.in   -> image.lock    what the image installs (Linux x86-64, Python 3.12, CUDA)
    requirements/cpu-dev.in -> cpu-dev.lock  the CPU development and CI environment (Python 3.11)
    requirements/unsloth.in -> unsloth.txt   unsloth and unsloth-zoo alone, for that environment

image.lock and cpu-dev.lock pin every package, dependencies included; unsloth.txt pins its two
packages without their dependencies (cpu-dev.in says why). All are installed with --no-deps, so
nothing is resolved at install time, and with --require-hashes: every pin carries the sha256 of
each file the index lists for it (uv lists them all, every platform's wheels and the sdist; the
CPU torch wheel's comes from the folder it lies in), so pip refuses a file substituted or
corrupted under a pinned name and version. Each lock records the moment it was resolved
(`# resolved-at:`). `check` resolves the input again with the package index frozen at that moment
(uv's --exclude-newer: the files uploaded later are left out too) and demands the same pins and,
for each, the same hashes: a release published later cannot change the verdict, while a lock that
no longer satisfies its input (a pin changed in the .in file, a package added or dropped) or whose
hashes are not those of the pin's files fails it, naming each difference.

    python requirements/lock.py write [NAME ...]                 # `make lock`: resolve now, record the moment
    python requirements/lock.py write --keep-moment [NAME ...]   # resolve as of the moment each lock records
    python requirements/lock.py check [NAME ...]                 # what the tests run; asks the package index

Run `make lock` after editing an .in file, or to take newer releases on purpose; commit the .in
and the .lock together. `--keep-moment` rewrites a lock without taking anything newer: the same
pins, with their hashes and notes written afresh. The locks' hashes were written that way, so each
`resolved-at` is still the moment its pins were chosen (unsloth.txt records cpu-dev.lock's: its
two pins were chosen with that lock's).
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
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)")
# The CPU build of torch that the development environment uses lies in this folder on the
# project's machines (pip's find-links); PyPI's Linux torch is a CUDA build of several GB.
TORCH_CPU_WHEELS = "/opt/wheels"


@dataclass(frozen=True)
class Lock:
    source: Path  # the .in file: what we ask for
    target: Path  # the lock: every package (or the source's alone), pinned, with hashes
    python_version: str
    platform: str = "x86_64-manylinux_2_28"
    index_args: tuple[str, ...] = field(default=())  # where uv looks (default: PyPI)
    dependencies: bool = True  # False: the packages of source alone, not what they depend on

    @property
    def name(self) -> str:
        return self.target.stem


LOCKS = {
    "image": Lock(HERE / "image.in", HERE / "image.lock", "3.12"),
    "cpu-dev": Lock(HERE / "cpu-dev.in", HERE / "cpu-dev.lock", "3.11", index_args=("--find-links", TORCH_CPU_WHEELS)),
    "unsloth": Lock(HERE / "unsloth.in", HERE / "unsloth.txt", "3.11", dependencies=False),
}


class LockError(Exception):
    """A lock that cannot be checked or written: the message says why and what to do."""


def entries(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """Normalised name -> (version, its `sha256:...` hashes) of every `name==version` requirement.

    A requirement may go on over lines ending in a backslash, one `--hash=` each, as uv writes it.
    """
    result = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#")[0].strip()
        found = PIN.match(line)
        if found:
            hashes = frozenset(w.removeprefix("--hash=") for w in line.split() if w.startswith("--hash="))
            result[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = (found.group(2), hashes)
    return result


def pins(path: Path) -> dict[str, str]:
    """Normalised name -> version of every `name==version` requirement (comments ignored)."""
    return {name: version for name, (version, _) in entries(path).items()}


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
    """Resolve lock.source as the index stood at `at` into dest (uv's own format with hashes, no header)."""
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
        "--generate-hashes",
        *(() if lock.dependencies else ("--no-deps",)),
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
    locked = entries(lock.target)
    problems = [
        f"{name}: {lock.source.name} asks for =={version}, {lock.target.name} pins {pinned(locked, name)}"
        for name, version in pins(lock.source).items()
        if not satisfies(locked.get(name, (None,))[0], version)
    ]
    at = resolved_at(lock)
    with tempfile.TemporaryDirectory() as tmp:
        fresh_file = Path(tmp) / lock.target.name
        resolve(lock, at, fresh_file)
        fresh = entries(fresh_file)
    for name in sorted(set(locked) | set(fresh)):
        if pinned(locked, name) != pinned(fresh, name):
            problems.append(
                f"{name}: {lock.target.name} pins {pinned(locked, name)}, "
                f"but {lock.source.name} resolves to {pinned(fresh, name)} as of {at}"
            )
            continue
        # The same version: its hashes must be those of the files the index lists for it.
        (version, held), files = locked[name], fresh[name][1]
        where = f"on the index as of {at}"
        if not held:
            problems.append(f"{name}: {lock.target.name} pins {version} with no hash ({len(files)} file(s) {where})")
            continue
        problems += [
            f"{name}: {lock.target.name} holds {unknown} for {version}, the hash of none of its files {where}"
            for unknown in sorted(held - files)
        ]
        if files - held:
            problems.append(
                f"{name}: {lock.target.name} lacks the hashes of {len(files - held)} of the {len(files)} files "
                f"of {version} {where}"
            )
    return problems


def pinned(found: dict[str, tuple[str, frozenset[str]]], name: str) -> str:
    return found[name][0] if name in found else "nothing"


def write(lock: Lock, at: str | None = None) -> str:
    """Resolve now (or as of `at`) and replace the lock; returns the moment recorded."""
    at = at or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fd, tmp = tempfile.mkstemp(dir=lock.target.parent, prefix=f".{lock.target.name}.")
    os.close(fd)
    try:
        resolve(lock, at, Path(tmp))
        which = (
            f"Every package of {lock.source.name}, dependencies included,"
            if lock.dependencies
            else f"The packages of {lock.source.name} alone, not their dependencies,"
        )
        header = (
            f"# {which} for Python {lock.python_version} on {lock.platform}.\n"
            f"# Written by `make lock` (requirements/lock.py); `make test` checks it.\n"
            f"# Install with --no-deps --require-hashes.\n"
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
    parser.add_argument(
        "--keep-moment",
        action="store_true",
        help="write: resolve as of the moment each lock records, not now (the same pins, hashes written afresh)",
    )
    args = parser.parse_intermixed_args(argv)  # `write --keep-moment NAME`: an option between positionals
    unknown = [name for name in args.locks if name not in LOCKS]
    if unknown:
        print(f"error: no lock named {', '.join(unknown)}; the locks are {', '.join(LOCKS)}", file=sys.stderr)
        return 2
    if args.keep_moment and args.action != "write":
        print("error: --keep-moment goes with write; check always resolves as of each lock's moment", file=sys.stderr)
        return 2
    failed = False
    for name in args.locks or list(LOCKS):
        lock = LOCKS[name]
        try:
            if args.action == "write":
                at = write(lock, resolved_at(lock) if args.keep_moment else None)
                shown = lock.target.relative_to(HERE.parent) if lock.target.is_relative_to(HERE.parent) else lock.target
                print(f"{shown}: resolved as of {at}")
                continue
            problems = differences(lock)
        except LockError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for problem in problems:
            print(f"{lock.target.name}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            count = len(pins(lock.target))
            print(f"{lock.target.name}: keeps its promise ({count} pins with their hashes, as of {resolved_at(lock)})")
    if failed:
        print(
            "error: a lock does not match its input or its files' hashes; run `make lock` (or, to keep its pins, "
            "`python requirements/lock.py write --keep-moment NAME`) and commit the .in and .lock files",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
