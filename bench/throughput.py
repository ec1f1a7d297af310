"""Side-by-side training throughput on one GPU: the launcher + recipe path, a bare Unsloth
script and plain transformers + PEFT + TRL, with the same model, data and settings.

    python bench/throughput.py --size 1b --loads 16bit,4bit --steps 25 --out docs/benchmarks/throughput.json
    python bench/throughput.py --size 1b --loads full --stacks launcher --steps 15 --out ...

`--loads full` is full fine-tuning (every weight trains, 16-bit), which only the launcher
stack runs; it exists to check the planner's full fine-tuning memory, which decides when
`auto` shards with FSDP2. Each run is a fresh process. Results are merged into --out (keyed by size, load and stack), so
several invocations build one file; `python bench/report.py` turns it into a table and a chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import settings

from entrypoint import memory
from trainer import progress

BENCH = Path(__file__).resolve().parent
STACKS = ("launcher", "unsloth", "hf")


def recipe_for(size: str, load: str, model: Path, data: Path, steps: int, out: Path) -> str:
    full = load == "full"
    trained = (
        "lora: null\n"
        if full
        else f"lora:\n  r: {settings.LORA_R}\n  alpha: {settings.LORA_ALPHA}\n"
        f"  target_modules: {json.dumps(settings.TARGET_MODULES)}\n"
    )
    return f"""# Benchmark recipe written by bench/throughput.py
name: bench-{size}-{load}
model:
  name: {model}
  max_seq_length: {settings.SEQ_LEN}
  load_in: {"16bit" if full else load}
  full_finetuning: {str(full).lower()}
  dtype: bfloat16
{trained}data:
  source: {data}
  format: text
training:
  method: sft
  max_steps: {steps}
  learning_rate: {settings.LEARNING_RATE}
  lr_scheduler: linear
  warmup_steps: {settings.WARMUP}
  per_device_batch_size: {settings.BATCH}
  gradient_accumulation_steps: 1
  seed: {settings.SEED}
  optimizer: {settings.OPTIMIZER}
  gradient_checkpointing: unsloth
output:
  dir: {out}
  resume: false
logging:
  report_to: none
  steps: 5
"""


def run_stack(stack: str, size: str, load: str, steps: int, work: Path) -> dict:
    model, data = settings.prepare(size, steps, work)
    tag = f"{size}-{load}-{stack}"
    result_file = work / f"{tag}.json"
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(settings.ROOT), os.environ.get("PYTHONPATH", "")])}
    if stack == "launcher":
        recipe = work / f"bench-{size}-{load}.yaml"
        out = work / "runs" / tag
        recipe.write_text(recipe_for(size, load, model, data, steps, out))
        command = [sys.executable, "-m", "entrypoint", "run", str(recipe)]
        env["PARALLELISM"] = "single"
        if size == "tiny":
            env["ALLOW_CPU"] = "1"  # the tiny shape only checks the benchmark itself
    else:
        script = BENCH / ("bare_unsloth.py" if stack == "unsloth" else "plain_hf.py")
        command = [sys.executable, str(script), str(model), str(data), load, str(steps), str(result_file)]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = round(time.time() - started, 1)
    if done.returncode != 0:
        return {"stack": stack, "error": (done.stdout + done.stderr)[-3000:], "exit_status": done.returncode}
    if stack == "launcher":
        metrics = json.loads((work / "runs" / tag / "metrics.json").read_text())
        result = {
            k: metrics[k]
            for k in (
                "steady_tokens_per_second",
                "step_time_s",
                "time_to_first_step_s",
                "steps_measured",
                "first_loss",
                "final_loss",
                "losses",
            )
        }
        result["peak_memory_gib"] = metrics["peak_memory_gib"][0]
    else:
        result = json.loads(result_file.read_text())
    return {**result, "stack": stack, "wall_s": wall, "command": " ".join(command)}


def machine() -> dict:
    import unsloth  # noqa: I001  (first, as Unsloth wants)
    import torch
    import transformers
    import trl

    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except FileNotFoundError:
        gpu = "none (CPU)"
    return {
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "unsloth": unsloth.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(settings.SHAPES), default="1b")
    parser.add_argument("--loads", default="16bit,4bit")
    parser.add_argument("--stacks", default=",".join(STACKS))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--work", default="/tmp/unsloth-recipes-bench")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    work = Path(args.work)
    for load in args.loads.split(","):
        for stack in args.stacks.split(","):
            key = f"{args.size}/{load}/{stack}"
            print(f"== {key}", flush=True)
            run = run_stack(stack, args.size, load, args.steps, work)
            run.update(size=args.size, load=load, steps=args.steps)
            results["runs"][key] = run
            print(json.dumps({k: v for k, v in run.items() if k not in ("losses", "command")}), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    results["machine"] = machine()
    results["settings"] = {
        "shapes": {
            k: {**v.model_dump(), "parameters": memory.Shape.from_random_init(v).parameters()}
            for k, v in settings.SHAPES.items()
        },
        "seq_len": settings.SEQ_LEN,
        "batch": settings.BATCH,
        "lora_r": settings.LORA_R,
        "lora_alpha": settings.LORA_ALPHA,
        "target_modules": settings.TARGET_MODULES,
        "optimizer": settings.OPTIMIZER,
        "learning_rate": settings.LEARNING_RATE,
        "warmup_steps_excluded_from_throughput": progress.WARMUP_STEPS,
    }
    results["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results.setdefault("commands", [])
    results["commands"].append(" ".join(["python", "bench/throughput.py", *sys.argv[1:]]))
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
