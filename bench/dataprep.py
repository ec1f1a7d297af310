"""The data phase's own time (metrics.json's data_prepare_s: every row checked, shaped and tokenized,
or reused, or read where local rank 0 put it) on a large local ShareGPT file, on the CPU, through the
real launcher: one process against two (CPU_PROCESSES=2: local rank 0 prepares, the other rank waits
and reads), each with an empty cache; then each again, reusing what the first prepared.

    python bench/dataprep.py --rows 100000 --out docs/benchmarks/dataprep-cpu.json

Rows: bench/chats.py's chats (LMSYS-Chat-1M's lengths, 568 tokens on average) as ShareGPT rows, of
words the model's tokenizer holds whole. Model: bench/settings.py's tiny shape (a 32k BPE tokenizer),
a local folder; the recipe trains one step of one row, so the run is the data phase and start-up.
Each run has its own output folder; the cache (HF_HOME) is empty for a first run and the first run's
for a second. Targets (issue 25): two processes' data phase at most 1.2x one process's; a second
run's at least 5x faster than the first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import chats
import settings

RUNS = (  # (name, CPU_PROCESSES, the cache it uses)
    ("one process, empty cache", "1", "hf-one"),
    ("two processes, empty cache", "2", "hf-two"),
    ("one process, second run", "1", "hf-one"),
    ("two processes, second run", "2", "hf-two"),
)


def recipe_text(model: Path, data: Path) -> str:
    return f"""# Benchmark recipe written by bench/dataprep.py
name: dataprep
allow_cpu: true
model: {{name: {model}, max_seq_length: {settings.SEQ_LEN}, load_in: 16bit, dtype: float32}}
lora: {{r: 8, alpha: 8, target_modules: [q_proj, v_proj]}}
data: {{source: {data}, format: sharegpt}}
training: {{max_steps: 1, per_device_batch_size: 1, gradient_accumulation_steps: 1, optimizer: adamw_torch,
           gradient_checkpointing: false, warmup_steps: 0}}
logging: {{report_to: none}}
"""


def run(name: str, processes: str, cache: Path, recipe: Path, out: Path) -> dict:
    env = {**os.environ, "CPU_PROCESSES": processes, "PARALLELISM": "ddp" if processes != "1" else "single"}
    env |= {"HF_HOME": str(cache), "PYTHONPATH": os.pathsep.join([str(settings.ROOT), env.get("PYTHONPATH", "")])}
    if processes == "1":
        env.pop("CPU_PROCESSES")
    command = [sys.executable, "-m", "entrypoint", "run", str(recipe), f"output.dir={out}"]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=7200)
    wall = round(time.time() - started, 1)
    shown = ("" if processes == "1" else f"CPU_PROCESSES={processes} ") + (
        f"HF_HOME={cache.name} python -m entrypoint run dataprep.yaml output.dir=runs/N"
    )
    if done.returncode != 0:
        return {"run": name, "command": shown, "exit_status": done.returncode, "error": done.stderr[-3000:]}
    m = json.loads((out / "metrics.json").read_text())
    return {
        "run": name,
        "processes": int(processes),
        "data_prepare_s": m["data_prepare_s"],  # local rank 0's: the rank that prepares
        "data_per_rank": [per_rank(r) for r in m["data_per_rank"]],
        "wall_s": wall,
        "command": shown,
    }


def per_rank(record: dict) -> dict:
    """What a rank did in each stage (built, reused, read), with how many rows and in how long."""
    stages = {s: {k: record[s][k] for k in ("done", "rows", "seconds")} for s in ("shaped", "tokenized")}
    return {"local_rank": record["local_rank"], "seconds": record["seconds"], **stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/unsloth-recipes-dataprep")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, _ = settings.prepare("tiny", 1, work)
    data = work / f"sharegpt-{args.rows}.jsonl"
    if not data.exists():
        rows = chats.chats(args.rows, chats.whole_words(model), sharegpt=True)
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = work / "dataprep.yaml"
    recipe.write_text(recipe_text(model, data))
    for _, _, cache in RUNS:
        shutil.rmtree(work / cache, ignore_errors=True)
    results = []
    for index, (name, processes, cache) in enumerate(RUNS):
        print(f"== {name}", flush=True)
        results.append(run(name, processes, work / cache, recipe, work / "runs" / str(index)))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "data_per_rank"}), flush=True)
    seconds = {r["run"]: r.get("data_prepare_s") for r in results}
    one, two = seconds["one process, empty cache"], seconds["two processes, empty cache"]
    report = {
        "rows": args.rows,
        "file_bytes": data.stat().st_size,
        "runs": results,
        "two_over_one": round(two / one, 3) if one and two else None,
        "first_over_second": {
            processes: round(seconds[f"{processes}, empty cache"] / seconds[f"{processes}, second run"], 1)
            for processes in ("one process", "two processes")
            if seconds[f"{processes}, empty cache"] and seconds[f"{processes}, second run"]
        },
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/dataprep.py", *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
