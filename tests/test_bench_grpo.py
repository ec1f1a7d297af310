"""The GRPO benchmark (bench/grpo.py) on the CPU: its check of the completion lengths it forces, and the whole
benchmark on the tiny shape, through the launcher, with every generation that runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "bench"))
import grpo


def generation_call(step: int, lengths: list[int]) -> dict:
    targets = [[row, n] for row, n in enumerate(lengths)]
    return {"event": "timed", "name": "GRPOTrainer.transformers.generate", "step": step, "rank": 0, "targets": targets}


def test_a_step_whose_logged_lengths_are_not_the_drawn_ones_is_caught():
    records = [generation_call(0, [4, 8, 12]), generation_call(1, [5, 5, 20])]
    logs = [
        {"completions/mean_length": 8.0, "completions/min_length": 4.0, "completions/max_length": 12.0},
        {"completions/mean_length": 16.0, "completions/min_length": 16.0, "completions/max_length": 16.0},
    ]
    checked = grpo.lengths_held(records, logs)
    assert [s["held"] for s in checked["steps"]] == [True, False]
    assert not checked["held"]


@pytest.mark.e2e
def test_the_tiny_benchmark_runs_each_generation_through_the_launcher_with_the_lengths_it_drew(tmp_path):
    out = tmp_path / "grpo.json"
    command = [sys.executable, "bench/grpo.py", "--tiny", "--no-reward-run", "--steps", "2"]
    done = subprocess.run(
        [*command, "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {run["generation"]: run for run in json.loads(out.read_text())["runs"]}
    assert sorted(runs) == ["continuous_batching", "transformers"]
    for generation, run in runs.items():
        assert run["exit_status"] == 0 and run["ran_as"] == "single"
        assert run["generated_with"] == run["planned_generation"] == generation
        assert run["forced_lengths"]["held"], run["forced_lengths"]
        assert run["steps_measured"] == 1 and run["steps_per_second"] > 0
        assert 0 < run["generation_share"] < 1 and run["generation_tokens_per_second"] > 0
        assert run["plan_estimate_gib"] > 0 and run["peak_memory_gib"]
    assert runs["continuous_batching"]["paged_cache_written"]  # its attention read and wrote the paged cache
    assert not runs["transformers"]["paged_cache_written"]


def test_a_run_ended_at_the_deadline_is_timed_from_one_steps_preparing_to_the_next():
    prepared = [(0, 100.0, 6.0), (1, 110.0, 4.0), (2, 117.0, 5.0)]  # step, when the block ended, its seconds
    records = [
        {"event": "timed", "name": "GRPOTrainer._prepare_inputs", "step": s, "rank": 0, "time": t, "seconds": d}
        for s, t, d in prepared
    ]
    assert grpo.step_times({"interrupted": "SIGTERM", "steps": 2}, records) == (
        {0: 12.0, 1: 6.0},
        "the probe (no metrics.json times)",
    )
