"""Training throughput on real-length chats, through the real launcher: the same rows and recipe in
padded batches, in the recipes' default batches and packed, counting the tokens of the rows
(padding left out) per second.

    python bench/realdata.py --sizes 1b,8b                        # one GPU -> docs/benchmarks/realdata-<gpu>.json
    python bench/realdata.py --tiny --out /tmp/realdata-cpu.json  # checks the script itself on the CPU

Rows: 2000 chats (the CPU check: 200) whose lengths follow LMSYS-Chat-1M's published statistics (bench/chats.py gives
the distribution and its parameters), messages rows of words the model's tokenizer holds whole.
Models: bench/settings.py's random-init shapes, built offline (LoRA r=16 on every linear layer, bf16,
16-bit weights, batch 8 of settings.SEQ_LEN tokens at most; the CPU check: the tiny shape in float32,
batch 4 of 256). Each run is a fresh
`python -m entrypoint run RECIPE` with PARALLELISM=single and its own output folder; the first also
runs `plan --json`, whose data report gives the rows' token lengths (p50, p95, max) under the model's
tokenizer and the padding a padded batch would hold. The batchings:

  padded    UNSLOTH_PADDING_CHOICE=padded: every batch padded to its longest row. Unsloth 2026.10
            chooses padding-free batches itself on H100/H200 and under several processes
            (unsloth/utils/padding_choice.py), so a padded baseline must be forced.
  default   what a recipe does: training.packing false, Unsloth's own choice (padding-free on
            H100/H200; measured hardware by its rule)
  packing   training.packing true: rows packed into full sequences (TRL's bfd), padding-free

metrics.json's steady_real_tokens_per_second (the rows' tokens, no padding, over the steps after
the first five) is `real_tokens_per_second`; steady_tokens_per_second counts every position.
Results are merged into the output file (keyed by model and batching).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import chats
import settings
import throughput

BATCHINGS = {
    "padded": ([], {"UNSLOTH_PADDING_CHOICE": "padded"}),
    "default": ([], {}),
    "packing": (["training.packing=true"], {}),
}
STEPS = {"tiny": 6, "1b": 30, "8b": 20}
BATCH = {"tiny": 4, "1b": 8, "8b": 8}
SEQ_LEN = {"tiny": 256}  # the CPU check: short sequences; the GPU shapes use settings.SEQ_LEN
ROWS = {"tiny": 200}  # else 2000: more than any run takes (steps x batch; packed rows hold several)


def recipe_text(size: str, model: Path, data: Path, out: Path) -> str:
    tiny = size == "tiny"
    return f"""# Benchmark recipe written by bench/realdata.py
name: realdata-{size}
allow_cpu: {str(tiny).lower()}
model:
  name: {model}
  max_seq_length: {SEQ_LEN.get(size, settings.SEQ_LEN)}
  load_in: 16bit
  dtype: {"float32" if tiny else "bfloat16"}
lora:
  r: {settings.LORA_R}
  alpha: {settings.LORA_ALPHA}
  target_modules: {json.dumps(settings.TARGET_MODULES)}
data:
  source: {data}
  format: messages
training:
  method: sft
  max_steps: {STEPS[size]}
  learning_rate: {settings.LEARNING_RATE}
  warmup_steps: {settings.WARMUP}
  per_device_batch_size: {BATCH[size]}
  gradient_accumulation_steps: 1
  seed: {settings.SEED}
  optimizer: {"adamw_torch" if tiny else settings.OPTIMIZER}
  gradient_checkpointing: {"false" if tiny else "unsloth"}
output:
  dir: {out}
  resume: false
logging:
  report_to: none
  steps: 5
"""


def environment(work: Path, extra: dict[str, str], tiny: bool) -> dict[str, str]:
    env = {**os.environ, **extra, "PARALLELISM": "single", "HF_HOME": str(work / "hf")}
    env["PYTHONPATH"] = os.pathsep.join([str(settings.ROOT), os.environ.get("PYTHONPATH", "")])
    if tiny:
        env["ALLOW_CPU"] = "1"
    return env


def lengths_report(recipe: Path, env: dict[str, str]) -> dict | None:
    """The launcher's data report of the rows: their token lengths under the model's tokenizer."""
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint", "plan", str(recipe), "--json"], env=env, capture_output=True, text=True
    )
    return json.loads(done.stdout)["data"][0] if done.returncode == 0 else None


def run(size: str, batching: str, model: Path, data: Path, work: Path, tiny: bool) -> dict:
    overrides, extra = BATCHINGS[batching]
    out = work / "runs" / f"{size}-{batching}"
    recipe = work / f"realdata-{size}.yaml"
    recipe.write_text(recipe_text(size, model, data, out))
    env = environment(work, extra, tiny)
    command = [sys.executable, "-m", "entrypoint", "run", str(recipe), *overrides]
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    shown = " ".join([*(f"{k}={v}" for k, v in extra.items()), "python -m entrypoint run", recipe.name, *overrides])
    entry = {"model": size, "batching": batching, "command": shown, "wall_s": round(time.time() - started, 1)}
    if done.returncode != 0:
        return entry | {"exit_status": done.returncode, "error": (done.stdout + done.stderr)[-3000:]}
    m = json.loads((out / "metrics.json").read_text())
    real, every = m["steady_real_tokens_per_second"], m["steady_tokens_per_second"]
    return entry | {
        "mode": m["mode"],
        "real_tokens_per_second": real,
        "tokens_per_second": every,
        "padding_share": round(1 - real / every, 4) if real and every else None,
        "peak_memory_gib": max(m["peak_memory_gib"][0].values()),
        "step_time_s": m["step_time_s"],
        "steps": m["steps"],
        "data_prepare_s": m["data_prepare_s"],
        "final_loss": m["final_loss"],
    }


def gpu_name() -> str | None:
    try:
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.splitlines()
    except FileNotFoundError:
        return None
    return name[0].split()[-1].lower() if name else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,8b", help="bench/settings.py shapes, e.g. 1b,8b")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU: checks the script itself")
    parser.add_argument("--batchings", default=",".join(BATCHINGS))
    parser.add_argument("--work", default="/tmp/unsloth-recipes-realdata")
    parser.add_argument("--out", help="default: docs/benchmarks/realdata-<gpu>.json")
    args = parser.parse_args()
    gpu = gpu_name()
    if args.out is None and (args.tiny or gpu is None):
        parser.error("name the results file with --out (no GPU here to name it after)")
    out = Path(args.out or settings.ROOT / "docs" / "benchmarks" / f"realdata-{gpu}.json")
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for size in sizes:
        model, _ = settings.prepare(size, STEPS[size], work)
        data = work / f"chats-{model.name}.jsonl"
        if not data.exists():
            rows = chats.chats(ROWS.get(size, 2000), chats.whole_words(model))
            data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        recipe = work / f"realdata-{size}.yaml"
        recipe.write_text(recipe_text(size, model, data, work / "runs" / size))
        results.setdefault("rows", {})[size] = lengths_report(recipe, environment(work, {}, args.tiny))
        for batching in args.batchings.split(","):
            print(f"== {size} {batching}", flush=True)
            entry = run(size, batching, model, data, work, args.tiny)
            print(json.dumps({k: v for k, v in entry.items() if k != "error"}), flush=True)
            results["runs"] = [r for r in results["runs"] if (r["model"], r["batching"]) != (size, batching)]
            results["runs"].append(entry)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
    results["distribution"] = chats.DISTRIBUTION
    results["machine"] = throughput.machine()
    results["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results.setdefault("commands", []).append(" ".join(["python", "bench/realdata.py", *sys.argv[1:]]))
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
