"""The real-data benchmark (bench/realdata.py) end to end on the CPU with its tiny model: the same
chat rows trained in padded batches, in the recipes' default batches and packed, each through the
real launcher, and the results file the GPU run will write."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env


@pytest.mark.e2e
def test_realdata_tiny_trains_each_batching_and_writes_real_tokens_per_second(tmp_path):
    out = tmp_path / "realdata.json"
    command = [sys.executable, "bench/realdata.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads(out.read_text())
    runs = {run["batching"]: run for run in results["runs"]}
    assert sorted(runs) == ["default", "packing", "padded"]
    for run in runs.values():
        assert (run["model"], run["mode"], run["steps"]) == ("tiny", "single", 6)
        assert run["real_tokens_per_second"] > 0 and run["peak_memory_gib"] > 0
        assert run["real_tokens_per_second"] <= run["tokens_per_second"], "padding is not counted as a row's token"
    assert runs["padded"]["command"].startswith("UNSLOTH_PADDING_CHOICE=padded python -m entrypoint run")
    assert runs["packing"]["command"].endswith("training.packing=true")
    rows = results["rows"]["tiny"]
    assert rows["unit"] == "tokens" and rows["p50"] < rows["p95"] < rows["max"]
    assert results["distribution"]["prompt_tokens"] == {"lognormal_mu": 3.7413, "sigma": 1.0}
    assert results["commands"] == [f"python bench/realdata.py --tiny --out {out} --work {tmp_path / 'work'}"]
