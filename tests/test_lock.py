"""The locks (requirements/*.lock) keep their promise, and the check of that promise cannot be
turned red by what a package index publishes after a lock was written.

Most tests here use a package index of our own on 127.0.0.1 (a PEP 691 JSON index that gives
each file its upload time, as PyPI does), so the index's state is part of the test. The two
tests named `..._network_...` check the real locks against PyPI: the registries are the one
network these machines reach, and the image cannot be built without them either.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
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


def build_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{info}/METADATA", metadata)
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", "")
    return path


class Index(http.server.ThreadingHTTPServer):
    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), IndexHandler)
        self.folder = folder
        self.pages: dict[str, dict] = {}
        for name, releases in RELEASES.items():
            files = []
            for version, uploaded, requires in releases:
                wheel = build_wheel(folder, name, version, requires)
                files.append(
                    {
                        "filename": wheel.name,
                        "url": f"{self.url}/files/{wheel.name}",
                        "hashes": {"sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()},
                        "upload-time": uploaded,
                    }
                )
            self.pages[name] = {
                "meta": {"api-version": "1.1"},
                "name": name,
                "versions": [r[0] for r in releases],
                "files": files,
            }

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


def test_a_lock_that_does_not_record_its_moment_is_refused_with_the_fix(tmp_path):
    lock = locks.Lock(tmp_path / "stack.in", tmp_path / "stack.lock", "3.12")
    lock.target.write_text("app==1.0\n")

    with pytest.raises(locks.LockError, match=r"records no '# resolved-at:' moment; rewrite it with `make lock`"):
        locks.resolved_at(lock)


def test_an_unknown_lock_name_is_one_error_line_and_exit_2(capsys):
    assert locks.main(["check", "imag"]) == 2
    assert capsys.readouterr().err == "error: no lock named imag; the locks are image, cpu-dev\n"


# ---- the project's own locks: what they hold (offline) and that they re-resolve (the registry)


def test_the_image_lock_pins_what_image_in_and_pyprojects_dependencies_ask():
    lock = locks.pins(ROOT / "requirements" / "image.lock")
    for name, version in locks.pins(ROOT / "requirements" / "image.in").items():
        assert lock[name] == version, name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in project["project"]["dependencies"]:
        name = re.split(r"[<>=!~ ]", requirement)[0].lower()
        assert name in lock, requirement


def test_the_development_environment_trains_with_the_images_versions_of_the_stack():
    image = locks.pins(ROOT / "requirements" / "image.lock")
    dev = locks.pins(ROOT / "requirements" / "cpu-dev.lock") | locks.pins(ROOT / "requirements" / "unsloth.txt")
    for name in ("transformers", "trl", "datasets", "peft", "accelerate", "unsloth", "unsloth-zoo", "pydantic"):
        assert dev[name] == image[name], name


@pytest.mark.network
@pytest.mark.parametrize("name", list(locks.LOCKS))
def test_network_each_lock_re_resolves_from_the_registry_as_of_its_moment(name):
    assert locks.differences(locks.LOCKS[name]) == []
