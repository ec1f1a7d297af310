"""The locks (requirements/*.lock, unsloth.txt) keep their promise, the check of that promise
cannot be turned red by what a package index publishes after a lock was written, and a lock's
hashes make pip refuse a file that is not the one the lock was written with.

Most tests here use a package index of our own on 127.0.0.1 (a PEP 691 JSON index that gives
each file its upload time, as PyPI does), so the index's state is part of the test. The tests
named `..._network_...` check the real locks against PyPI: the registries are the one network
these machines reach, and the image cannot be built without them either.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "requirements"))
import lock as locks  # requirements/lock.py: a script, not a package

JANUARY, FEBRUARY, MARCH, APRIL = (f"2026-0{m}-01T00:00:00Z" for m in (1, 2, 3, 4))


# ---- an index of our own: name -> [(version, upload time, requirements)]

RELEASES = {
    "app": [("1.0", JANUARY, ["lib>=1.0"]), ("2.0", JANUARY, ["lib>=1.0"])],
    "lib": [("1.0", JANUARY, []), ("1.1", MARCH, [])],  # 1.1 comes out after the lock is written
}


def build_wheel(
    folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any", code: str = ""
) -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{info}/METADATA", metadata)
        wheel = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", "")
        if code:
            archive.writestr(f"{name}.py", code)
    return path


class Index(http.server.ThreadingHTTPServer):
    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), IndexHandler)
        self.folder = folder
        self.pages: dict[str, dict] = {}
        for name, releases in RELEASES.items():
            for version, uploaded, requires in releases:
                self.publish(build_wheel(folder, name, version, requires), uploaded)

    def publish(self, wheel: Path, uploaded: str) -> None:
        """List a wheel of the folder on its package's page, in place of a file of the same name."""
        name, version = wheel.name.split("-")[:2]
        page = self.pages.setdefault(name, {"meta": {"api-version": "1.1"}, "name": name, "versions": [], "files": []})
        if version not in page["versions"]:
            page["versions"].append(version)
        page["files"] = [f for f in page["files"] if f["filename"] != wheel.name] + [
            {
                "filename": wheel.name,
                "url": f"{self.url}/files/{wheel.name}",
                "hashes": {"sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()},
                "upload-time": uploaded,
            }
        ]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class IndexHandler(http.server.BaseHTTPRequestHandler):
    server: Index

    def do_GET(self) -> None:
        self.answer(with_body=True)

    def do_HEAD(self) -> None:  # uv asks whether a wheel allows range requests
        self.answer(with_body=False)

    def answer(self, with_body: bool) -> None:
        parts = [p for p in self.path.split("/") if p]
        if len(parts) == 2 and parts[0] == "simple" and parts[1] in self.server.pages:
            body, kind = json.dumps(self.server.pages[parts[1]]).encode(), "application/vnd.pypi.simple.v1+json"
        elif len(parts) == 2 and parts[0] == "files" and (self.server.folder / parts[1]).is_file():
            body, kind = (self.server.folder / parts[1]).read_bytes(), "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    folder = tmp_path / "index"
    folder.mkdir()
    server = Index(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def lock_on(index: Index, folder: Path, asked: str) -> locks.Lock:
    source = folder / "stack.in"
    source.write_text(asked)
    return locks.Lock(source, folder / "stack.lock", "3.12", index_args=("--index-url", f"{index.url}/simple"))


def pip_install(index: Index, requirements: Path, into: Path) -> subprocess.CompletedProcess:
    """pip as `make` and the Dockerfile run it, from our index alone (--isolated: no pip.conf, no PIP_*)."""
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-cache-dir"]
    command += ["--index-url", f"{index.url}/simple", "--target", str(into)]
    command += ["--no-deps", "--require-hashes", "-r", str(requirements)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


HASH_MISMATCH = "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE"


# ---- the check, against our own index


def test_a_release_after_the_locks_moment_does_not_change_the_checks_verdict(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    assert locks.write(lock, at=FEBRUARY) == FEBRUARY
    assert locks.pins(lock.target) == {"app": "1.0", "lib": "1.0"}
    assert locks.resolved_at(lock) == FEBRUARY

    # lib 1.1 is on the index now: a resolution as of today takes it, so a check without the
    # lock's moment would fail a lock that nothing in the project changed ...
    today = tmp_path / "today.lock"
    locks.resolve(lock, APRIL, today)
    assert locks.pins(today)["lib"] == "1.1"
    # ... while the check, frozen at the lock's moment, still finds nothing wrong.
    assert locks.differences(lock) == []


def test_a_lock_whose_input_asks_for_another_version_fails_the_check(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    lock.source.write_text("app==2.0\n")

    problems = locks.differences(lock)

    assert "app: stack.in asks for ==2.0, stack.lock pins 1.0" in problems
    assert any(p.startswith("app: stack.lock pins 1.0, but stack.in resolves to 2.0") for p in problems)


def test_a_lock_missing_a_dependency_fails_the_check_naming_it(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    lock.target.write_text(re.sub(r"(?m)^lib==.*\n(    #.*\n)*", "", lock.target.read_text()))

    assert locks.differences(lock) == [f"lib: stack.lock pins nothing, but stack.in resolves to 1.0 as of {FEBRUARY}"]


def test_a_lock_pin_without_hashes_fails_the_check_naming_it(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    lock.target.write_text(re.sub(r"(?m)^(lib==1\.0) \\\n(    --hash=.*\n)+", r"\1\n", lock.target.read_text()))

    assert locks.entries(lock.target)["lib"] == ("1.0", frozenset())
    assert locks.differences(lock) == [
        f"lib: stack.lock pins 1.0 with no hash (1 file(s) on the index as of {FEBRUARY})"
    ]


def test_a_lock_hash_of_no_file_on_the_index_fails_the_check_naming_it(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    (real,) = locks.entries(lock.target)["lib"][1]
    forged = "sha256:" + "0" * 64
    lock.target.write_text(lock.target.read_text().replace(real, forged))

    assert locks.differences(lock) == [
        f"lib: stack.lock holds {forged} for 1.0, the hash of none of its files on the index as of {FEBRUARY}",
        f"lib: stack.lock lacks the hashes of 1 of the 1 files of 1.0 on the index as of {FEBRUARY}",
    ]


def test_write_keep_moment_rewrites_at_the_recorded_moment_not_taking_newer_releases(index, tmp_path, monkeypatch):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    lock.target.write_text(re.sub(r" \\\n(    --hash=.*(\n|$))+", "\n", lock.target.read_text()))
    assert all(not hashes for _, hashes in locks.entries(lock.target).values())
    monkeypatch.setattr(locks, "LOCKS", {"stack": lock})

    assert locks.main(["write", "--keep-moment", "stack"]) == 0

    assert locks.resolved_at(lock) == FEBRUARY
    assert locks.pins(lock.target) == {"app": "1.0", "lib": "1.0"}  # not lib 1.1, out since March
    assert locks.differences(lock) == []


def test_a_lock_that_does_not_record_its_moment_is_refused_with_the_fix(tmp_path):
    lock = locks.Lock(tmp_path / "stack.in", tmp_path / "stack.lock", "3.12")
    lock.target.write_text("app==1.0\n")

    with pytest.raises(locks.LockError, match=r"records no '# resolved-at:' moment; rewrite it with `make lock`"):
        locks.resolved_at(lock)


def test_keep_moment_with_check_is_one_error_line_and_exit_2(capsys):
    assert locks.main(["check", "--keep-moment"]) == 2
    assert capsys.readouterr().err == (
        "error: --keep-moment goes with write; check always resolves as of each lock's moment\n"
    )


def test_an_unknown_lock_name_is_one_error_line_and_exit_2(capsys):
    assert locks.main(["check", "imag"]) == 2
    assert capsys.readouterr().err == "error: no lock named imag; the locks are image, cpu-dev, unsloth\n"


# ---- what pip makes of a lock's hashes, against our own index


def test_a_written_lock_installs_with_require_hashes(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)

    done = pip_install(index, lock.target, tmp_path / "site")

    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in (tmp_path / "site").glob("*.dist-info")} == {"app-1.0.dist-info", "lib-1.0.dist-info"}


def test_a_lock_line_whose_hash_is_altered_fails_the_install(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    (real,) = locks.entries(lock.target)["lib"][1]
    altered = real[:-1] + ("0" if real[-1] != "0" else "1")
    lock.target.write_text(lock.target.read_text().replace(real, altered))

    done = pip_install(index, lock.target, tmp_path / "site")

    assert done.returncode != 0
    assert HASH_MISMATCH in done.stderr and f"Expected sha256 {altered.removeprefix('sha256:')}" in done.stderr, (
        done.stdout + done.stderr
    )


def test_a_wheel_substituted_on_the_index_fails_the_install(index, tmp_path):
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    # Same name, same version, other contents, listed with its own hash: what a compromised
    # mirror or a tampered cache would serve.
    index.publish(build_wheel(index.folder, "lib", "1.0", [], code="import os\n"), JANUARY)

    done = pip_install(index, lock.target, tmp_path / "site")

    assert done.returncode != 0
    assert HASH_MISMATCH in done.stderr and "lib==1.0" in done.stderr, done.stdout + done.stderr


def test_a_wheel_added_to_a_locked_version_after_the_locks_moment_is_passed_over(index, tmp_path):
    # PyPI lets a project add wheels to a published release: the lock holds no hash of one added
    # later, and pip, among the files whose hash the lock holds, still finds the one it locked.
    lock = lock_on(index, tmp_path, "app==1.0\n")
    locks.write(lock, at=FEBRUARY)
    python = f"py{sys.version_info.major}{sys.version_info.minor}"  # preferred to py3 by this pip
    index.publish(build_wheel(index.folder, "lib", "1.0", [], tag=f"{python}-none-any"), MARCH)

    done = pip_install(index, lock.target, tmp_path / "site")

    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "lib-1.0.dist-info" / "WHEEL").read_text().endswith("Tag: py3-none-any\n")


# ---- the project's own locks: what they hold (offline) and that they re-resolve (the registry)


def test_the_image_lock_pins_what_image_in_and_pyprojects_dependencies_ask():
    lock = locks.pins(ROOT / "requirements" / "image.lock")
    for name, version in locks.pins(ROOT / "requirements" / "image.in").items():
        assert lock[name] == version, name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in project["project"]["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement)[0].lower()
        assert name in lock, requirement


@pytest.mark.parametrize("name", list(locks.LOCKS))
def test_every_pin_of_each_lock_carries_its_files_hashes(name):
    found = locks.entries(locks.LOCKS[name].target)
    assert found
    assert [pin for pin, (_, hashes) in found.items() if not hashes] == []


def test_the_development_environment_trains_with_the_images_versions_of_the_stack():
    image = locks.pins(ROOT / "requirements" / "image.lock")
    dev = locks.pins(ROOT / "requirements" / "cpu-dev.lock") | locks.pins(ROOT / "requirements" / "unsloth.txt")
    for name in ("transformers", "trl", "datasets", "peft", "accelerate", "unsloth", "unsloth-zoo", "pydantic"):
        assert dev[name] == image[name], name


@pytest.mark.network
@pytest.mark.parametrize("name", list(locks.LOCKS))
def test_network_each_lock_re_resolves_from_the_registry_as_of_its_moment(name):
    assert locks.differences(locks.LOCKS[name]) == []
