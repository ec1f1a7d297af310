"""End to end on the CPU: the launcher really trains the smoke recipe through Unsloth's CPU
backend, in one process and as a real two-process DDP run (gloo, through the generated
accelerate config and `accelerate launch`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_cli

pytestmark = pytest.mark.e2e


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_smoke_trains_in_one_process_and_its_loss_falls(tmp_path):
    done = run_cli("run", "smoke", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "smoke"
    m = metrics(out)
    assert (m["mode"], m["world_size"], m["device"], m["steps"]) == ("single", 1, "cpu", 60)
    assert m["final_loss"] < 0.5 * m["first_loss"], m["losses"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "launch" / "recipe.yaml").is_file() and (out / "launch" / "plan.json").is_file()
    assert m["tokens_per_second"] > 0 and m["time_to_first_step_s"] > 0
    assert any((out / "tensorboard").iterdir()), "TensorBoard logs are written in the output folder"
    assert "done: smoke [single x1] 60 steps" in done.stdout


def test_smoke_as_two_process_ddp_keeps_ranks_identical_and_writes_one_adapter(tmp_path):
    done = run_cli("run", "smoke", "training.max_steps=20", cwd=tmp_path, env=clean_env(CPU_PROCESSES="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "smoke"
    m = metrics(out)
    assert (m["mode"], m["world_size"]) == ("ddp", 2)
    fingerprints = m["trainable_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert len(m["peak_memory_gib"]) == 2
    adapters = list(out.rglob("adapter_model.safetensors"))
    assert adapters == [out / "adapter" / "adapter_model.safetensors"]
    assert (out / "launch" / "accelerate_config.yaml").is_file()
    assert m["final_loss"] < m["first_loss"]


def test_training_program_refuses_model_mode_under_a_multi_process_launch(tmp_path):
    env = clean_env(WORLD_SIZE="2", LOCAL_RANK="0", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "recipes.train", "--recipe", "smoke", "--mode", "model", f"output.dir={tmp_path}/o"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "device_map='auto' in any distributed mode" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
