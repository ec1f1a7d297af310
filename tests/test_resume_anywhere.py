"""A run stopped under one number of processes resumes under another: the global batch kept (the
gradient accumulation, and where that alone cannot, the rows per process, recomputed), the optimizer,
scheduler and data position restored, each rank that existed keeping its random state, so the loss
curve continues the one an uninterrupted run draws. What cannot be read back is refused before any
model loads.

The smoke recipe at a constant learning rate, no evaluation, a loss logged every step. The resumed
steps' losses equal the uninterrupted run's to 1e-3 relative: the same rows make each step's
global batch, and only the order in which processes and accumulation sum the gradients differs."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import clean_env, run_cli
from test_faults import start, wait_until_training

from recipes import catalog, runs
from recipes.errors import BadInput

PLAIN = ["data.eval_fraction=null", "training.eval_steps=0", "logging.steps=1", "logging.report_to=none"]
TOLERANCE = 1e-3


def train(folder: Path, processes: str, *overrides: str) -> dict:
    done = run_cli("run", "smoke", *PLAIN, *overrides, cwd=folder, env=clean_env(CPU_PROCESSES=processes))
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(folder)


def metrics(folder: Path) -> dict:
    return json.loads((folder / "outputs" / "smoke" / "metrics.json").read_text())


def losses(run: dict) -> dict[int, float]:
    return dict((step, loss) for step, loss in run["losses"])


def continues(resumed: dict, uninterrupted: dict) -> None:
    after = losses(resumed)
    assert after, "the resumed run logged no loss"
    for step, loss in after.items():
        assert loss == pytest.approx(losses(uninterrupted)[step], rel=TOLERANCE), step


def resumable_copy(uninterrupted: Path, folder: Path) -> Path:
    """The uninterrupted run's folder as it was at its step-6 checkpoint."""
    shutil.copytree(uninterrupted / "outputs", folder / "outputs")
    out = folder / "outputs" / "smoke"
    for later in ("checkpoints/checkpoint-12", "adapter", "metrics.json"):
        shutil.rmtree(out / later, ignore_errors=True) if (out / later).is_dir() else (out / later).unlink()
    return folder


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("uninterrupted-2")
    return folder, train(folder, "2", "training.max_steps=12", "output.save_steps=6")


@pytest.mark.e2e
def test_a_run_stopped_by_sigterm_under_two_processes_resumes_under_one_with_its_global_batch(tmp_path, two_processes):
    launcher = start(tmp_path, *PLAIN, "training.max_steps=20000", CPU_PROCESSES="2")
    wait_until_training(tmp_path / "launcher.log", launcher)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 143
    step = metrics(tmp_path)["steps"]
    assert step + 3 <= 12, f"stopped at step {step}, past what the uninterrupted run covers"
    resumed = train(tmp_path, "1", f"training.max_steps={step + 3}")
    assert resumed["resumed_from"].endswith(f"checkpoint-{step}") and resumed["world_size"] == 1
    assert (resumed["global_batch_size"], resumed["gradient_accumulation_steps"]) == (8, 2)
    continues(resumed, two_processes[1])


@pytest.mark.e2e
def test_a_run_of_two_processes_resumes_under_four_with_fewer_rows_each(tmp_path, two_processes):
    folder = resumable_copy(two_processes[0], tmp_path)
    resumed = train(folder, "4", "training.max_steps=12")
    assert (resumed["world_size"], resumed["global_batch_size"], resumed["gradient_accumulation_steps"]) == (4, 8, 1)
    assert [s for s, _ in resumed["losses"]] == list(range(7, 13))
    continues(resumed, two_processes[1])


@pytest.mark.e2e
def test_a_single_process_run_resumes_under_two(tmp_path_factory):
    first = tmp_path_factory.mktemp("uninterrupted-1")
    uninterrupted = train(first, "1", "training.max_steps=12", "output.save_steps=6")
    folder = resumable_copy(first, tmp_path_factory.mktemp("resumed-under-2"))
    resumed = train(folder, "2", "training.max_steps=12")
    assert (resumed["world_size"], resumed["global_batch_size"]) == (2, 4)
    continues(resumed, uninterrupted)


@pytest.mark.e2e
def test_plan_says_what_the_resume_will_do(two_processes, tmp_path):
    folder = resumable_copy(two_processes[0], tmp_path)
    done = run_cli("plan", "smoke", *PLAIN, cwd=folder, env=clean_env(CPU_PROCESSES="1"))
    assert done.returncode == 0, done.stderr
    expected = "from checkpoint-6 (step 6): 2 process(es) x 4 rows x 1 accumulated -> 1 x 4 x 2, the global batch"
    assert f"resume      {expected} of 8 rows kept" in done.stdout


# ---- without training


def checkpoint_of(folder: Path, mode: str, world_size: int = 2) -> Path:
    path = folder / "outputs" / "smoke" / "checkpoints" / "checkpoint-3"
    path.mkdir(parents=True)
    facts = {"mode": mode, "world_size": world_size, "per_device_batch_size": 4, "gradient_accumulation_steps": 1}
    runs.mark_whole(path, facts | {"global_batch_size": 4 * world_size})
    return path


def test_a_sharded_checkpoint_is_refused_under_ddp_before_anything_loads(tmp_path):
    checkpoint = checkpoint_of(tmp_path, "fsdp")
    done = run_cli("run", "smoke", cwd=tmp_path, env=clean_env(CPU_PROCESSES="2", PARALLELISM="ddp"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {checkpoint} was written under PARALLELISM=fsdp, and this run is ddp" in done.stderr
    assert "resume it under PARALLELISM=fsdp (any number of processes)" in done.stderr
    assert not (tmp_path / "outputs" / "smoke" / "launch").exists()


def test_where_no_shape_keeps_the_global_batch_the_nearest_is_said(tmp_path):
    recipe = catalog.load("smoke").recipe
    checkpoint = checkpoint_of(tmp_path, "ddp")
    resume = runs.resume_on(checkpoint, runs.whole(checkpoint), "ddp", 3, recipe)
    assert not resume.exact and resume.now["global_batch_size"] == 12
    assert "the global batch was 8 rows and cannot be kept with 3 processes: the nearest is 12" in resume.describe()


def test_a_finished_run_is_refused_rather_than_resumed(tmp_path):
    checkpoint = checkpoint_of(tmp_path, "ddp")
    recipe = catalog.load("smoke", ["training.max_steps=3"]).recipe
    with pytest.raises(BadInput, match="already at or past training.max_steps=3"):
        runs.resume_on(checkpoint, runs.whole(checkpoint), "ddp", 2, recipe)
