"""Acting on a plan: status propagation and signals reaching the whole child process group."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, clean_env, plan_for

from entrypoint import launch
from recipes import atomic, catalog

# A child that starts a grandchild; each records the signal it got and exits with status 7.
FAMILY = r"""
import os, signal, subprocess, sys, time
marks = sys.argv[1]
def on_term(signum, frame):
    open(os.path.join(marks, f"{sys.argv[2]}-{signum}"), "w").close()
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
if sys.argv[2] == "child":
    subprocess.Popen([sys.executable, __file__, marks, "grandchild"])
open(os.path.join(marks, f"{sys.argv[2]}-ready"), "w").close()
while True:
    time.sleep(0.1)
"""


def plan_running(tmp_path: Path, command: list[str]) -> Path:
    env = {"OUTPUTS_DIR": str(tmp_path / "outputs")}
    p = plan_for(env, catalog.load("smoke"), [], str(tmp_path))
    p = dataclasses.replace(p, command=command)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": dataclasses.asdict(p)}))
    return path


def start_launcher(plan_file: Path) -> subprocess.Popen:
    code = (
        "import json, sys, time; from entrypoint import launch, plan; "
        f"d = json.load(open({str(plan_file)!r}))['plan']; "
        "sys.exit(launch.execute(plan.Plan(**d), time.time()))"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(ROOT)))


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_reaches_the_child_and_grandchild_and_the_launcher_reports_143(tmp_path):
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    marks = tmp_path / "marks"
    marks.mkdir()
    launcher = start_launcher(plan_running(tmp_path, [sys.executable, str(script), str(marks), "child"]))
    wait_for(marks / "child-ready")
    wait_for(marks / "grandchild-ready")
    launcher.send_signal(signal.SIGTERM)
    # The child exits 7 on SIGTERM; after forwarding it, the launcher reports the signal itself.
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    wait_for(marks / f"grandchild-{int(signal.SIGTERM)}", seconds=10)
    assert (marks / f"child-{int(signal.SIGTERM)}").exists()


def test_a_child_killed_by_a_signal_gives_128_plus_the_signal():
    assert launch.exit_status(-signal.SIGKILL) == 128 + signal.SIGKILL
    assert launch.exit_status(3) == 3


def test_the_child_exit_status_becomes_the_launchers(tmp_path):
    launcher = start_launcher(plan_running(tmp_path, [sys.executable, "-c", "raise SystemExit(5)"]))
    assert launcher.wait(timeout=60) == 5
    assert (tmp_path / "outputs" / "smoke" / "launch" / "recipe.yaml").is_file()


def test_files_are_written_atomically(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic.write_text(target, "hello")
    assert target.read_text() == "hello" and os.listdir(target.parent) == ["b.txt"]
