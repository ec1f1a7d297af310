"""Faults: preemption (SIGTERM as Kubernetes sends it), a dead rank, a full disk, and inputs
that must not reach a path or a shell. Training jobs run for hours on preemptible machines:
none of these may cost progress or hang."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, plan_for, write_recipe

from entrypoint import gpus, launch
from recipes import catalog
from recipes.errors import BadInput

GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


def start(tmp_path: Path, *overrides: str, **env: str) -> subprocess.Popen:
    log = (tmp_path / "launcher.log").open("a")
    return subprocess.Popen(
        [sys.executable, "-m", "entrypoint", "run", "smoke", *overrides],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(ROOT), **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_until_training(log: Path, launcher: subprocess.Popen, steps: int = 3, seconds: float = 300) -> None:
    """Until the run has logged `steps` losses (it logs every step: logging.steps=1), however slow
    the machine: a fixed sleep would send the signal before the first step on a busy one."""
    deadline = time.time() + seconds
    while log.read_text(errors="replace").count("{'loss'") < steps:
        assert launcher.poll() is None, "the run ended before training began"
        assert time.time() < deadline, f"no {steps} training steps within {seconds} s"
        time.sleep(0.2)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize(("processes", "parallelism"), [("1", "auto"), ("2", "ddp"), ("2", "fsdp")])
def test_sigterm_mid_training_checkpoints_exits_143_within_the_grace_period_and_the_next_run_resumes(
    tmp_path, processes, parallelism
):
    out = tmp_path / "outputs" / "smoke"
    shape = {"CPU_PROCESSES": processes, "PARALLELISM": parallelism}
    launcher = start(tmp_path, "training.max_steps=20000", "logging.steps=1", **shape)
    wait_until_training(tmp_path / "launcher.log", launcher)
    sent = time.time()
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=GRACE_S) == 128 + signal.SIGTERM
    assert time.time() - sent < GRACE_S
    stopped = metrics(out)
    assert stopped["interrupted"] == "SIGTERM" and not (out / "adapter").exists()
    checkpoint = Path(stopped["checkpoint"])
    assert checkpoint.is_dir() and stopped["steps"] > 0
    # Every rank stopped at the same step: each left its RNG state in the same checkpoint.
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == (
        ["rng_state.pth"] if processes == "1" else ["rng_state_0.pth", "rng_state_1.pth"]
    )

    step = stopped["steps"]
    again = start(tmp_path, f"training.max_steps={step + 10}", "logging.steps=5", **shape)
    assert again.wait(timeout=300) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    resumed = metrics(out)
    assert resumed["resumed_from"] == str(checkpoint) and resumed["steps"] == step + 10
    assert all(s > step for s, _ in resumed["losses"])
    assert resumed["final_loss"] < stopped["losses"][0][1], "the loss continues instead of starting over"


def ranks_of(marker: str) -> dict[str, int]:
    """LOCAL_RANK -> pid of the training processes whose environment holds the marker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer" in cmdline.split(b"\0") and marker.encode() in b"\0".join(environ):
            local = next((v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"LOCAL_RANK=")), None)
            if local is not None:
                found[local] = int(entry.name)
    return found


@pytest.mark.e2e
def test_a_dead_rank_ends_the_whole_job_promptly_instead_of_hanging(tmp_path):
    out = tmp_path / "outputs" / "smoke"
    marker = str(tmp_path / "outputs")  # in every rank's environment, so this run's ranks can be found
    launcher = start(
        tmp_path,
        "training.max_steps=20000",
        "training.collective_timeout_s=60",
        "logging.steps=1",
        CPU_PROCESSES="2",
        OUTPUTS_DIR=marker,
    )
    wait_until_training(tmp_path / "launcher.log", launcher)
    ranks = ranks_of(marker)
    assert set(ranks) == {"0", "1"}
    killed = time.time()
    os.kill(ranks["1"], signal.SIGKILL)
    status = launcher.wait(timeout=120)
    assert status != 0 and time.time() - killed < 60
    assert not (out / "adapter").exists()
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks.values()), "no rank is left running"


def test_the_collective_timeout_reaches_the_trainer():
    from recipes.runs import Run
    from trainer.methods import shared_arguments

    recipe = catalog.load("smoke", ["training.collective_timeout_s=90"]).recipe
    assert shared_arguments(Run(Path("/tmp/x"), recipe), "no")["ddp_timeout"] == 90


def test_ddp_does_not_look_for_unused_weights_when_lora_trains_whole_modules():
    from recipes.runs import Run
    from trainer.methods import shared_arguments

    def trainer_config(recipe):
        return shared_arguments(Run(Path("/tmp/x"), recipe), "no")

    # smoke trains lm_head in full: find_unused_parameters=True crashed its first ddp step on GPUs.
    assert trainer_config(catalog.load("smoke").recipe)["ddp_find_unused_parameters"] is False
    plain = catalog.load("smoke", ["lora.target_modules=[q_proj,v_proj]"]).recipe
    assert trainer_config(plain)["ddp_find_unused_parameters"] is None


def test_a_disk_too_small_for_the_outputs_is_reported_before_anything_is_written(tmp_path):
    env = {"OUTPUTS_DIR": str(tmp_path / "runs")}
    p = plan_for(env, catalog.load("smoke"), [], str(tmp_path))
    with pytest.raises(BadInput, match=r"GiB free but the run will write ~1e\+06 GiB"):
        launch.check_output(dataclasses.replace(p, disk_gib=1e6), {})
    assert list(tmp_path.iterdir()) == []


def test_the_plan_counts_exports_and_checkpoints_in_the_disk_it_needs():
    gpu = gpus.assumed("1x80")
    plain = plan_for({}, catalog.load("mistral-7b-lora-alpaca"), gpu, "/w")
    more = ["output.save=[adapter,merged_16bit]", "output.save_steps=5", "output.keep_checkpoints=3"]
    big = plan_for({}, catalog.load("mistral-7b-lora-alpaca", more), gpu, "/w")
    assert big.disk_gib > plain.disk_gib + 13  # the merged 16-bit copy of 7B parameters alone


@pytest.mark.parametrize("name", ["../../etc", "a/b", "x; rm -rf ~", "$(reboot)", "", ".hidden"])
def test_a_recipe_name_cannot_escape_the_output_folder_or_reach_a_shell(tmp_path, name):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = write_recipe(
        tmp_path, "r", f"name: {json.dumps(name)}\nmodel: {{name: a/b}}\ndata: {{source: d.jsonl, format: text}}\n"
    )
    with pytest.raises(BadInput, match="name"):
        catalog.load(str(path))


def test_a_recipe_file_name_unfit_for_a_folder_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    path = write_recipe(tmp_path, "my recipe;x", "model: {name: a/b}\ndata: {source: d.jsonl, format: text}\n")
    with pytest.raises(BadInput, match="not usable as a run name"):
        catalog.load(str(path))


def test_remote_code_stays_off_unless_a_recipe_asks():
    assert all(not catalog.load(name).recipe.model.trust_remote_code for name in catalog.bundled())
    assert catalog.load("smoke", ["model.trust_remote_code=true"]).recipe.model.trust_remote_code


def test_the_launcher_never_runs_a_shell():
    # Commands are argv lists; no module of the launcher or the training program asks for a shell.
    for path in [*sorted((ROOT / "entrypoint").glob("*.py")), *sorted((ROOT / "recipes").glob("*.py"))]:
        text = path.read_text()
        assert "shell=True" not in text and "os.system(" not in text and "os.popen(" not in text, path


def test_a_folder_written_atomically_replaces_the_old_one_only_when_complete(tmp_path):
    from recipes import atomic

    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic.folder(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-save")
    assert (dest / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic.folder(dest) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (dest / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_files_a_run_writes_are_readable_as_the_umask_allows_not_private(tmp_path):
    # Written through a temp file (mkstemp makes it 0600): under docker run --user, another host
    # user must still be able to read metrics.json as they read any file the run wrote.
    from recipes import atomic

    previous = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
