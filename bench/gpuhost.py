"""What the GPU benchmarks share about the machine they run on: the variables that keep NVLink multicast off,
nvidia-smi's answers, the versions and GPUs a result was measured with, and a log's tail. Imports nothing of the
torch stack (the facts about torch come from a child process), so a benchmark's own process stays light."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# NVLink multicast stays off in every process started here, children included (the launcher passes
# its environment on to accelerate and the ranks): on these shared hosts a program that uses it can
# put every GPU of the host out of service.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def plan(argv: list[str], env: dict[str, str], cwd: Path) -> dict:
    """`python -m entrypoint plan ARGV --json` with a run's environment: the launcher's plan as a dict, or
    {"error": its output's tail, "exit_status": ...} where it refused."""
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint", "plan", *argv, "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-2000:], "exit_status": done.returncode}
    return json.loads(done.stdout)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def smi(*query: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [[c.strip() for c in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]


def machine(tiny: bool) -> dict:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'nccl': str(torch.cuda.nccl.version()) if torch.cuda.is_available() else None}))",
        ],
        capture_output=True,
        text=True,
    )
    facts = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    with contextlib.suppress(ValueError):
        facts.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    if tiny:
        return {**facts, "gpu": "none (CPU, --tiny)"}
    rows = smi("--query-gpu=index,name,memory.total,driver_version")
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
    topo = re.sub(r"\x1b\[[0-9;]*m", "", topo)  # nvidia-smi underlines the header
    gpu = f"{len(rows)} x {rows[0][1]}" if rows else "unknown"
    return {**facts, "gpu": gpu, "gpus": rows, "topology": topo}
