"""Killed at any moment, a run resumes: a checkpoint counts only when it is whole, one job writes a
run folder at a time, and no training process outlives its launcher.

The moment a kill lands is made certain, not raced: the file transformers writes last into a
checkpoint (trainer_state.json) is a named pipe that nobody reads, so the writer blocks inside it
until the test kills the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, processes_with, run_cli
from test_faults import start, wait_until_training

from entrypoint import runlock
from recipes import runs
from recipes.errors import BadInput


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.2)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize(("processes", "parallelism"), [("1", "auto"), ("2", "ddp"), ("2", "fsdp")])
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_whole_one_before(tmp_path, processes, parallelism):
    out = tmp_path / "outputs" / "smoke"
    marker = f"kill-test-{tmp_path.name}"
    shape = {"CPU_PROCESSES": processes, "PARALLELISM": parallelism, "KILL_TEST": marker}
    launcher = start(tmp_path, "training.max_steps=40", "output.save_steps=1", "logging.steps=1", **shape)
    log = tmp_path / "launcher.log"
    wait_until_training(log, launcher, steps=1)
    # Steps ahead of the run (the launcher has already set aside what it found), the checkpoint it
    # will write then gets the pipe: a folder already there means the run got there first.
    step = log.read_text(errors="replace").count("{'loss'") + 6
    blocked = out / "checkpoints" / f"checkpoint-{step}"
    blocked.mkdir()
    os.mkfifo(blocked / "trainer_state.json")
    wait_for(lambda: any(blocked.glob("rng_state*.pth")), 300, f"the checkpoint of step {step} half written")
    for pid in processes_with(marker):  # the whole run at once, as a lost node or an OOM kill of the pod
        os.kill(pid, signal.SIGKILL)
    launcher.wait(timeout=30)

    again = [f"training.max_steps={step + 2}", "output.save_steps=1"]
    done = run_cli("run", "smoke", *again, cwd=tmp_path, env=clean_env(**shape))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: {blocked} is not a whole checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert (out / "checkpoints-incomplete" / blocked.name / "trainer_state.json").exists(), "set aside, not deleted"
    resumed = metrics(out)
    assert resumed["resumed_from"] == str(out / "checkpoints" / f"checkpoint-{step - 1}")
    assert resumed["steps"] == step + 2
    assert runs.whole(out / "checkpoints" / f"checkpoint-{step + 2}")["world_size"] == int(processes)


@pytest.mark.e2e
def test_a_second_run_on_a_folder_in_use_is_refused_before_anything_loads(tmp_path):
    first = start(tmp_path, "training.max_steps=20000", "logging.steps=1")
    try:
        wait_until_training(tmp_path / "launcher.log", first)
        plan_file = tmp_path / "outputs" / "smoke" / "launch" / "plan.json"
        before = plan_file.read_text()
        done = run_cli("run", "smoke", "training.max_steps=5", cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.startswith("error: run folder ") and f"process {first.pid} on host " in done.stderr
        assert "TAKE_OVER_LOCK=1" in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert plan_file.read_text() == before, "the refused run wrote nothing"
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


@pytest.mark.e2e
def test_a_launcher_killed_alone_leaves_no_training_process_and_no_lock(tmp_path):
    marker = f"alone-{tmp_path.name}"
    shape = {"CPU_PROCESSES": "2", "KILL_TEST": marker}
    launcher = start(tmp_path, "training.max_steps=20000", "logging.steps=1", **shape)
    wait_until_training(tmp_path / "launcher.log", launcher)
    assert len(processes_with(marker)) >= 3  # the launcher, accelerate's, two ranks
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    wait_for(lambda: not processes_with(marker), 90, "every process of the run ended")
    # Told by the kernel, each rank stopped as on a preemption: at one step, with a whole checkpoint.
    stopped = metrics(tmp_path / "outputs" / "smoke")
    assert stopped["interrupted"] == "SIGTERM" and runs.whole(Path(stopped["checkpoint"])) is not None
    done = run_cli("run", "smoke", f"training.max_steps={stopped['steps'] + 2}", cwd=tmp_path, env=clean_env(**shape))
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path / "outputs" / "smoke")["resumed_from"] == stopped["checkpoint"]


@pytest.mark.e2e
def test_a_checkpoint_that_cannot_be_read_back_ends_with_one_error_line_naming_it(tmp_path):
    done = run_cli("run", "smoke", "training.max_steps=2", "output.save_steps=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "smoke" / "checkpoints" / "checkpoint-2"
    (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
    again = run_cli("run", "smoke", "training.max_steps=4", cwd=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    error = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert error == [error[0]] and f"resuming from {checkpoint} failed" in error[0]
    assert "output.resume=false" in error[0]


# ---- without training


def write_checkpoint(folder: Path, step: int, whole: bool) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if whole:
        runs.mark_whole(path, {"world_size": 1})
    return path


def test_only_a_whole_checkpoint_is_resumed_exported_or_generated_from(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, 3, whole=True)
    write_checkpoint(checkpoints, 4, whole=False)
    assert runs.newest_checkpoint(checkpoints) == checkpoints / "checkpoint-3"


def test_keeping_checkpoints_never_removes_the_newest_whole_one(tmp_path):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, whole=True)
    being_written = write_checkpoint(tmp_path, 4, whole=False)
    assert runs.keep_newest(tmp_path, 1) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", being_written.name]


def test_an_incomplete_checkpoint_is_set_aside_not_deleted(tmp_path):
    write_checkpoint(tmp_path / "checkpoints", 2, whole=True)
    half = write_checkpoint(tmp_path / "checkpoints", 3, whole=False)
    (half / "adapter_model.safetensors").write_bytes(b"half")
    assert runs.set_aside_incomplete(tmp_path) == [(half, tmp_path / "checkpoints-incomplete" / "checkpoint-3")]
    assert (tmp_path / "checkpoints-incomplete" / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == b"half"


def hold_from(folder: Path, host: str, kernel: str = "another-machines-boot-id") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = runs.lock_file(folder)
    holder = {"host": host, "pid": 4242, "since": "2026-12-01T10:00:00+00:00", "kernel": kernel}
    lock.write_text(json.dumps(holder))
    return lock


def test_a_lock_held_from_another_machine_refuses_the_run_naming_the_holder(tmp_path):
    hold_from(tmp_path, "trainer-node-7")
    with pytest.raises(BadInput, match=r"process 4242 on host trainer-node-7 since 2026-12-01T10:00:00.*TAKE_OVER"):
        runlock.acquire(tmp_path, 0, {})


def test_take_over_lock_takes_a_lock_another_machine_left(tmp_path):
    lock = hold_from(tmp_path, "trainer-node-7")
    os.close(runlock.acquire(tmp_path, 0, {"TAKE_OVER_LOCK": "1"}))
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_lock_another_machine_stopped_touching_is_stale(tmp_path):
    lock = hold_from(tmp_path, "trainer-node-7")
    old = time.time() - runlock.STALE_S - 1
    os.utime(lock, (old, old))
    os.close(runlock.acquire(tmp_path, 0, {}))


def test_a_lock_left_by_another_container_of_this_machine_does_not_block_the_next_run(tmp_path):
    # Its hostname differs, its kernel does not: the flock alone decides, and the holder is gone.
    hold_from(tmp_path, "5f1c2d3e4a6b", kernel=runlock.kernel())
    os.close(runlock.acquire(tmp_path, 0, {}))


def test_a_live_lock_on_this_machine_refuses_a_second_holder(tmp_path):
    # flock is per open file: another process stands in for another job on this machine.
    code = f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r}); from entrypoint import runlock; "
    code += f"runlock.acquire(__import__('pathlib').Path({str(tmp_path)!r}), 0, {{}}); print('held', flush=True); "
    code += "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BadInput, match=rf"process {holder.pid} on host .* \(a live lock\)"):
            runlock.acquire(tmp_path, 0, {"TAKE_OVER_LOCK": "1"})
    finally:
        holder.kill()
        holder.wait()
