"""Prove the image's code path on a real GPU: the smoke recipe through the launcher in every
mode one GPU allows (single, model parallel on one GPU, ddp with NUM_GPUS=1), plus what must be
refused on real GPUs (the trap; fsdp with one GPU). Writes one JSON file and a markdown table.

    python bench/gpu_smoke.py --out docs/benchmarks/gpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("single", {"PARALLELISM": "single"}),
    ("model, one GPU", {"PARALLELISM": "model", "NUM_GPUS": "1"}),
    ("ddp, NUM_GPUS=1", {"PARALLELISM": "ddp", "NUM_GPUS": "1"}),
]
REFUSED = [
    ("the trap: model under a launcher", {"PARALLELISM": "model", "LOCAL_RANK": "0"}),
    ("fsdp with one GPU", {"PARALLELISM": "fsdp"}),
]


ROOT = Path(__file__).resolve().parent.parent


def launcher(env_extra: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **env_extra, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "entrypoint", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def gpu_name() -> str:
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="path prefix for the .json and .md results")
    args = parser.parse_args()
    rows = []
    for label, env in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.time()
            done = launcher(env, Path(tmp), "run", "smoke")
            wall = time.time() - started
            metrics_file = Path(tmp) / "outputs" / "smoke" / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            adapter = (Path(tmp) / "outputs" / "smoke" / "adapter" / "adapter_model.safetensors").is_file()
            plan_file = Path(tmp) / "outputs" / "smoke" / "launch" / "plan.json"
            plan = (
                json.loads(plan_file.read_text())
                if plan_file.exists()
                else {"mode": None, "device_map": None, "gpu_ids": None}
            )
            rows.append(
                {
                    "case": label,
                    "env": env,
                    "exit_status": done.returncode,
                    "mode": plan["mode"],
                    "device_map": plan["device_map"],
                    "gpu_ids": plan["gpu_ids"],
                    "device": metrics.get("device"),
                    "first_loss": metrics.get("first_loss"),
                    "final_loss": metrics.get("final_loss"),
                    "adapter_written": adapter,
                    "peak_memory_gib": metrics.get("peak_memory_gib"),
                    "wall_s": round(wall, 1),
                    "log_tail": (done.stdout + done.stderr)[-1500:] if done.returncode else "",
                }
            )
            print(json.dumps(rows[-1], indent=1), flush=True)
    refused = []
    for label, env in REFUSED:
        with tempfile.TemporaryDirectory() as tmp:
            done = launcher(env, Path(tmp), "run", "smoke")
            refused.append(
                {
                    "case": label,
                    "env": env,
                    "exit_status": done.returncode,
                    "message": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "",
                    "nothing_written": not any(Path(tmp).iterdir()),
                }
            )
            print(json.dumps(refused[-1], indent=1), flush=True)
    result = {
        "machine": {"gpu": gpu_name(), "python": platform.python_version()},
        "command": f"python bench/gpu_smoke.py --out {args.out}",
        "runs": rows,
        "refused": refused,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# The smoke recipe on a real GPU ({result['machine']['gpu']})",
        "",
        f"Command: `{result['command']}`",
        "",
        "| case | exit | mode | device_map | device | loss first -> final | adapter | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        peaks = r["peak_memory_gib"] or []
        peak = ", ".join(f"{k} {v}" for p in peaks for k, v in p.items())
        lines.append(
            f"| {r['case']} | {r['exit_status']} | {r['mode']} | `{json.dumps(r['device_map'])}` | "
            f"{r['device']} | {loss} | {r['adapter_written']} | {peak} |"
        )
    for r in refused:
        lines += ["", f"Refused, {r['case']}: exit {r['exit_status']}, nothing written: {r['nothing_written']}.", ""]
        lines += [f"> {r['message']}"]
    out.with_suffix(".md").write_text("\n".join([*lines, ""]))
    failed = [r for r in rows if r["exit_status"] != 0 or not r["adapter_written"]]
    wrongly = [r for r in refused if r["exit_status"] != 2 or not r["nothing_written"]]
    return 1 if failed or wrongly else 0


if __name__ == "__main__":
    sys.exit(main())
