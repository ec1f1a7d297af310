"""After training on a GPU: export the run to a merged 16-bit model and GGUF files, and load a GGUF
file back into llama.cpp to generate, all through the launcher as a user would; times and sizes.

    python bench/export_timing.py --size 8b --load 4bit --to merged_16bit gguf:q4_k_m \
        --llama-cpp /opt/llama.cpp --out docs/benchmarks/export-h100.json
    python bench/export_timing.py --size tiny --load 16bit --to merged_16bit gguf:q8_0,q4_k_m \
        --llama-cpp .venv/llama.cpp --out /tmp/export-cpu.json                # the script itself, CPU

Trains `--steps` steps of the benchmark recipe (bench/throughput.py's, a random-init shape of
bench/settings.py), then `python -m entrypoint export RUN --to ...` (merging happens on the CPU),
then `llama-simple -m FILE.gguf -n 16 PROMPT` for each GGUF file. One JSON object, and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import settings
import throughput

PROMPT = "The capital of France is"


def save(result: dict, out: Path) -> None:
    """After every step: a run cut short still leaves what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def wait_for(quantizer: Path, seconds: float) -> None:
    """The llama.cpp build may still be running beside the training (see the GPU command in
    docs/benchmarks/README.md); the export needs it."""
    deadline = time.time() + seconds
    while not quantizer.exists() and time.time() < deadline:
        time.sleep(2)


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, str]:
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    return done.returncode, round(time.time() - started, 1), done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(settings.SHAPES), default="8b")
    parser.add_argument("--load", choices=("16bit", "4bit"), default="4bit")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--to", nargs="+", default=["merged_16bit", "gguf:q4_k_m"])
    parser.add_argument("--llama-cpp", required=True, help="the built llama.cpp folder (UNSLOTH_LLAMA_CPP_PATH)")
    parser.add_argument("--work", default="/tmp/unsloth-recipes-export")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work, llama_cpp = Path(args.work), Path(args.llama_cpp).resolve()
    log = work / "export.log"
    model, data = settings.prepare(args.size, args.steps, work)
    out = work / "runs" / f"{args.size}-{args.load}"
    recipe = work / f"export-{args.size}-{args.load}.yaml"
    recipe.write_text(throughput.recipe_for(args.size, args.load, model, data, args.steps, out))
    path = os.pathsep.join([str(settings.ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PARALLELISM": "single", "UNSLOTH_LLAMA_CPP_PATH": str(llama_cpp)}
    if args.size == "tiny":
        env["ALLOW_CPU"] = "1"

    launcher = [sys.executable, "-m", "entrypoint"]
    result: dict = {"size": args.size, "load": args.load, "steps": args.steps, "to": args.to}
    status, seconds, _ = timed([*launcher, "run", str(recipe)], env, log)
    result["train"] = {"exit_status": status, "seconds": seconds, "command": f"python -m entrypoint run {recipe.name}"}
    save(result, Path(args.out))
    if status == 0:
        wait_for(llama_cpp / "llama-quantize", 600)
        command = [*launcher, "export", str(out), "--to", *args.to]
        status, seconds, _ = timed(command, env, log)
        result["export"] = {"exit_status": status, "seconds": seconds, "command": " ".join(["python", *command[1:]])}
        exported = json.loads((out / "exports.json").read_text()) if (out / "exports.json").is_file() else []
        result["exports"] = [{**e, "gib": round(e["bytes"] / 1024**3, 3)} for e in exported]
        result["loaded_back"] = []
        save(result, Path(args.out))
        for entry in exported:
            if entry["path"].endswith(".gguf"):
                command = [str(llama_cpp / "llama-simple"), "-m", entry["path"], "-n", "16", PROMPT]
                status, seconds, text = timed(command, env, log)
                generated = [line for line in text.splitlines() if line.startswith(PROMPT)]
                result["loaded_back"].append({"file": Path(entry["path"]).name, "exit_status": status,
                                              "seconds": seconds, "text": generated[:1]})  # fmt: skip
    smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    gpu = subprocess.run(smi, capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    result["machine"] = {
        "gpu": gpu or "none (CPU)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    result["command"] = " ".join(["python", "bench/export_timing.py", *sys.argv[1:]])
    save(result, Path(args.out))
    print(json.dumps(result, indent=2))
    return 0 if all(step.get("exit_status") == 0 for step in (result["train"], result.get("export", {}))) else 1


if __name__ == "__main__":
    sys.exit(main())
