"""GRPO on GPUs: where a step's time goes, and which generation is fastest on our stack.

The GSM8K GRPO recipe (recipes/qwen3-4b-grpo-gsm8k.yaml: bf16 LoRA r=32, 8 completions of one prompt per step,
max_completion_length 512, max_seq_length 1024, adamw_8bit) on a random-init model of Qwen3-4B's sizes with the
Llama architecture (bench/settings.py's qwen3-4b: hidden 2560, intermediate 9728, 36 layers, 32 heads of 128, 8
KV heads, vocabulary 151936, embeddings untied: 4.41B parameters where Qwen3-4B ties them for 4.02B), built
offline, for a fixed number of steps, once per generation (training.grpo.generation: transformers, which is
Unsloth's fast generate on a GPU, and continuous_batching, transformers' continuous batching), each a fresh
`python -m entrypoint run RECIPE` with PARALLELISM (and NUM_GPUS on GPUs) set as a user would, after
`python -m entrypoint plan RECIPE --json` with the same environment (the mode it chose, ran_as, and its per-GPU
estimate). Then the bundled tiny GRPO recipe (tests/recipes/tiny-grpo.yaml) as it is, for its mean reward per step.

    python3 bench/grpo.py --out docs/benchmarks/grpo-h200.json            # one GPU, the defaults below
    python3 bench/grpo.py --tiny --out /tmp/grpo-cpu.json                 # checks this script on the CPU

On one H200 (the GPU schedule; under 8 minutes, model building included):

    tar xzf .gpu-site.tgz -C /tmp && export PYTHONPATH=/tmp/.gpu-site:$PWD NCCL_NVLS_ENABLE=0 \
      TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 && \
      python3 bench/grpo.py --out $OUT/grpo-h200.json --logs $OUT --deadline-s 400

Sizing it (estimates from the H100/H200 runs of bench/throughput.py and bench/multigpu.py, not measurements of
GRPO): the 4B model is built (imports, 4.41B weights drawn in bf16 on the GPU, 8.8 GB written) while the tiny
recipe trains its 20 steps (about 60 s to its first step, then well under a second a step): 60-90 s for both.
Each 4B run takes 60-90 s to its first step (Unsloth's import and compilation, the load; the second run reuses
the first's compiled cache), then 7 steps of 3-12 s: the longest of 8 completions of 128-512 tokens, about 470
decode steps at 5-20 ms, and a forward and backward over about 5k tokens. That is 90-170 s a run, 240-430 s in
all. --deadline-s 400 bounds it: a 4B run starts only with 120 s left, and one still going at 415 s is sent
SIGTERM (the training program stops after its step, checkpoints and exits; it is killed 45 s later), keeping
what the probe timed: at most about 460 s, then the JSON is written.

Completion lengths. A random-init model seldom samples EOS, so each completion would run to
max_completion_length. Here every completion's length is drawn, uniform on [max/4, max] tokens (EOS included),
from a hash of a seed, the rank, the generation call and the completion's row in it: the same lengths for every
generation compared. A logits processor forces EOS at that length (bench/grpo_probe/sitecustomize.py says how, for
generate() and for continuous batching). Whether it held is checked for each run and step: the lengths drawn
against the lengths TRL itself logs (completions/mean_length, min_length, max_length).

Where a step's time goes. The probe (bench/grpo_probe/, put on PYTHONPATH of the runs measured here: Python imports
it at start-up in every process; it changes nothing in the product) records TRL's own timing blocks:
the generation call (`transformers.generate` / `transformers.generate_batch`, from before Unsloth's switch to
inference to after the switch back), `_calculate_rewards`, and `_prepare_inputs` (generation, rewards and the rest
of preparing the batch). A step's time is the training program's own (metrics.json: step_times_s, end to end;
for a run ended at the deadline, from one step's preparing to the next's, by the probe); what is not preparing is
training (forward, backward, optimizer). The first step (kernel compilation, CUDA graphs) is never measured.
Timings are wall clock: the generation loop synchronizes every token.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import gpuhost
import settings

from recipes import catalog

ROOT = settings.ROOT
PROBE = Path(__file__).resolve().parent / "grpo_probe"
RECIPE = "qwen3-4b-grpo-gsm8k"
TINY_RECIPE = ROOT / "tests" / "recipes" / "tiny-grpo.yaml"
GENERATIONS = ("transformers", "continuous_batching")  # what runs on our stack; vLLM is not in the image
GENERATION_BLOCKS = ("transformers.generate", "transformers.generate_batch", "vLLM.generate")
LAUNCHER_VARIABLES = ("PARALLELISM", "NUM_GPUS", "CPU_PROCESSES", "ALLOW_CPU", "CUDA_VISIBLE_DEVICES", "OUTPUTS_DIR")
LENGTH_SEED = 28
# --tiny: the same recipe, short, on the tiny shape; every generation runs on the CPU.
TINY = {
    "shape": "tiny",
    "steps": 3,
    "reward_steps": 4,
    "overrides": ["model.max_seq_length=128", "training.grpo.max_completion_length=32"],
}
FULL = {"shape": "qwen3-4b", "steps": 7, "reward_steps": None, "overrides": []}
# For the deadline: a run is not started with less time left (a 4B run's start and about 4 steps).
RUN_GUESS_S = {"tiny": 40, "qwen3-4b": 120}
WORDS = 2000  # the prompts' vocabulary: pseudo-words the offline tokenizer learns whole


# ---- the model and the prompts


def question_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """GSM8K-like rows: a question of 30-60 pseudo-words (with the system prompt and the chat template about as
    many tokens as a GSM8K prompt) and an answer in GSM8K's form, for the recipe's rewards."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(WORDS)]
    rows = []
    for _ in range(count):
        question = " ".join(rng.choices(vocab, k=rng.randint(30, 60))) + "?"
        rows.append({"question": question, "answer": f"{question[:40]} #### {rng.randint(1, 999)}"})
    return rows


def prepare(shape: str, work: Path) -> tuple[Path, Path]:
    """-> (model folder, data file), built once per shape. A process of its own (--prepare): drawing the weights
    on the GPU leaves memory cached there, which must not stay held beside the runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer import random_model

    work.mkdir(parents=True, exist_ok=True)
    data = work / "questions.jsonl"
    rows = question_rows(256)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = settings.SHAPES[shape]
    seq_len = catalog.load(RECIPE).recipe.model.max_seq_length

    def write_weights(config, folder: Path) -> None:
        # The offline tokenizer learns a few thousand tokens; the embeddings keep every row of the shape's vocabulary,
        # as real checkpoints pad theirs (the rows past the tokenizer decode to nothing).
        config.vocab_size = spec.vocab_size
        config.head_dim = settings.HEAD_DIM.get(shape, spec.hidden_size // spec.num_attention_heads)
        torch.manual_seed(spec.seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)

    texts = [r["question"] + " " + r["answer"] for r in rows]
    folder = random_model.folder_for(spec, f"grpo-{settings.HEAD_DIM.get(shape)}", seq_len, work / "models")
    return random_model.build(spec, texts, folder, seq_len, write_weights=write_weights), data


# ---- one run through the launcher


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kind = TINY if args.tiny else FULL
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)  # every run's working directory, the first one's too
        self.started = time.time()
        self.logs = Path(args.logs) if args.logs else self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.args.deadline_s - (time.time() - self.started)

    def env(self, probe_log: Path | None = None, lengths: str = "") -> dict[str, str]:
        """What a user sets (the mode and, on GPUs, their number), offline; the probe only where it measures."""
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("GRPO_PROBE")}
        path = [str(PROBE)] if probe_log else []
        path += [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env.update(gpuhost.NVLS_OFF, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path))
        env["PARALLELISM"] = self.args.mode
        if self.args.tiny:
            env["ALLOW_CPU"] = "1"
            if self.args.num_gpus > 1:  # processes on the CPU stand in for GPUs
                env["CPU_PROCESSES"] = str(self.args.num_gpus)
        else:
            env["NUM_GPUS"] = str(self.args.num_gpus)
        if probe_log:
            env.update(GRPO_PROBE_LOG=str(probe_log), GRPO_PROBE_LENGTHS=lengths)
        return env

    def command_text(self, env: dict[str, str], argv: list[str]) -> str:
        names = ("PARALLELISM", "NUM_GPUS", "CPU_PROCESSES", "ALLOW_CPU", "GRPO_PROBE_LENGTHS")
        shown = [f"{k}={env[k]}" for k in names if k in env]
        if "GRPO_PROBE_LOG" in env:
            shown.insert(0, "PYTHONPATH=bench/grpo_probe:$PYTHONPATH GRPO_PROBE_LOG=probe.jsonl")
        return " ".join([*shown, "python -m entrypoint", *map(shlex.quote, argv)])

    def plan(self, argv: list[str], env: dict[str, str]) -> dict:
        return gpuhost.plan(argv, env, self.work)

    def launch(self, argv: list[str], env: dict[str, str], log: Path) -> tuple[int | None, float]:
        """(exit status, None if ended at the deadline; seconds). cwd is the work folder for every run: one Unsloth
        compile cache (./unsloth_compiled_cache)."""
        started = time.time()
        with log.open("w") as handle:
            proc = subprocess.Popen(
                [sys.executable, "-m", "entrypoint", *argv],
                cwd=self.work,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = proc.wait(timeout=max(self.remaining() + self.args.grace_s, 30))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it; the program checkpoints and exits
                try:
                    proc.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this run's processes
                    proc.wait()
                status = None
        return status, round(time.time() - started, 1)

    def measure(self, generation: str, model: Path, data: Path) -> dict:
        """One run of the recipe's shape with this generation: plan, run, and what it measured."""
        tag = f"{self.kind['shape']}-{self.args.mode}{self.args.num_gpus}-{generation}"
        out, probe_log = self.work / "runs" / tag, self.logs / f"{tag}.probe.jsonl"
        probe_log.unlink(missing_ok=True)
        recipe = self.work / f"bench-grpo-{tag}.yaml"
        overrides = [
            f"model.name={model}",
            f"data.source={data}",
            "data.subset=null",
            f"training.max_steps={self.args.steps}",
            f"training.grpo.generation={generation}",
            "logging.steps=1",
            "logging.report_to=none",
            f"output.dir={out}",
            "output.save_steps=0",
            "output.resume=false",
            *self.kind["overrides"],
        ]
        resolved = catalog.load(RECIPE, overrides).recipe
        recipe.write_text(f"# written by bench/grpo.py from {RECIPE}\n" + catalog.to_yaml(resolved))
        grpo = resolved.training.grpo
        low, high = max(1, math.ceil(grpo.max_completion_length / 4)), grpo.max_completion_length
        env = self.env(probe_log, f"{low},{high},{LENGTH_SEED}")
        entry = {
            "model": self.kind["shape"],
            "mode": self.args.mode,
            "num_gpus": self.args.num_gpus,
            "generation": generation,
            "steps": self.args.steps,
            "lengths": {"uniform_on": [low, high], "eos_included": True, "seed": LENGTH_SEED},
        }
        plan = self.plan([str(recipe)], env)
        entry["ran_as"], entry["planned_generation"] = plan.get("mode"), plan.get("generation")
        entry["plan_estimate_gib"] = (plan.get("memory") or {}).get("per_gpu_gib")
        entry["plan_generation_gib"] = (plan.get("memory") or {}).get("generation_gib")
        entry["paged_cache"] = plan.get("paged_cache")
        entry["command"] = self.command_text(env, ["run", str(recipe)])
        log = self.logs / f"{tag}.log"
        entry["exit_status"], entry["wall_s"] = self.launch(["run", str(recipe)], env, log)
        records = [json.loads(line) for line in probe_log.read_text().splitlines()] if probe_log.exists() else []
        metrics_file = out / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        entry.update(summarize(metrics, records, trl_logs(log.read_text(errors="replace")), self.args.tiny))
        if entry["exit_status"] != 0 or "step_times_s" not in metrics:
            entry["error"] = ("stopped at the deadline\n" if entry["exit_status"] is None else "") + gpuhost.tail(log)
        return entry

    def reward_run(self) -> dict:
        """The tiny GRPO recipe as the tests run it (no probe: its completions end where the model ends them)."""
        steps = self.kind["reward_steps"]
        argv = ["run", str(TINY_RECIPE), f"output.dir={self.work / 'runs' / 'tiny-grpo'}", "output.resume=false"]
        argv += [f"training.max_steps={steps}"] if steps else []
        env = self.env()
        log = self.logs / "tiny-grpo.log"
        entry = {"recipe": str(TINY_RECIPE.relative_to(ROOT)), "mode": self.args.mode, "command": ""}
        entry["ran_as"] = self.plan(argv[1:], env).get("mode")
        entry["command"] = self.command_text(env, argv)
        entry["exit_status"], entry["wall_s"] = self.launch(argv, env, log)
        metrics_file = self.work / "runs" / "tiny-grpo" / "metrics.json"
        if entry["exit_status"] != 0 or not metrics_file.exists():
            return {**entry, "error": gpuhost.tail(log)}
        metrics = json.loads(metrics_file.read_text())
        rewards = [r for _, r in metrics["rewards"]]
        entry.update(rewards=rewards, steps=metrics["steps"], device=metrics["device"])
        if len(rewards) >= 6:  # the test's criterion (tests/test_grpo.py)
            first, last = statistics.mean(rewards[:3]), statistics.mean(rewards[-3:])
            entry.update(first_three_mean=round(first, 4), last_three_mean=round(last, 4), rose=last > first + 0.15)
        return entry


# ---- reading what a run measured


def trl_logs(text: str) -> list[dict[str, float]]:
    """The dicts TRL logs each step (logging.steps=1), in order; values as numbers."""
    found = []
    for match in re.finditer(r"\{'loss': .*?\}", text):
        with_numbers = {}
        for key, value in ast.literal_eval(match.group(0)).items():
            try:
                with_numbers[key] = float(value)
            except (TypeError, ValueError):
                continue
        found.append(with_numbers)
    return found


def per_step(records: list[dict], names: tuple[str, ...]) -> dict[int, float]:
    """Seconds per step of the main process's timing blocks whose names end with one of `names`."""
    seconds: dict[int, float] = {}
    for r in records:
        if r["rank"] == 0 and r["event"] == "timed" and r["name"].endswith(names):
            seconds[r["step"]] = seconds.get(r["step"], 0.0) + r["seconds"]
    return seconds


def lengths_held(records: list[dict], logs: list[dict[str, float]]) -> dict:
    """Per step: the lengths drawn (every process) against those TRL logged (gathered over every process)."""
    drawn: dict[int, list[int]] = {}
    for r in records:
        if r["event"] == "timed" and r["name"].endswith(GENERATION_BLOCKS):
            drawn.setdefault(r["step"], []).extend(length for _, length in r["targets"])
    steps = []
    for step, lengths in sorted(drawn.items()):
        logged = logs[step] if step < len(logs) else {}
        want = {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)}
        got = {k: logged.get(f"completions/{k}_length") for k in want}
        # TRL logs 4 significant digits.
        ok = all(got[k] is not None and math.isclose(got[k], want[k], rel_tol=1e-3) for k in want)
        steps.append({"step": step + 1, "drawn": want, "logged": got, "held": ok})
    return {"held": bool(steps) and all(s["held"] for s in steps), "steps": steps}


def summarize(metrics: dict, records: list[dict], logs: list[dict[str, float]], tiny: bool) -> dict:
    """Steps per second, generation's share of a step and its tokens per second, over the measured steps."""
    generate = per_step(records, GENERATION_BLOCKS)
    prepare = per_step(records, ("._prepare_inputs",))
    rewards = per_step(records, ("._calculate_rewards",))
    # Completion tokens each step on the main process: its completions at the mean length TRL logged.
    counts = {r["step"]: len(r["targets"]) for r in records if r["rank"] == 0 and "targets" in r}
    tokens = {s: n * logs[s].get("completions/mean_length", 0.0) for s, n in counts.items() if s < len(logs)}
    updates = [r["paged_cache_updates"] for r in records if r["rank"] == 0 and "paged_cache_updates" in r]
    found = {"generated_with": metrics.get("generation")}  # as TRL's trainer decided it (metrics.json)
    found["generation_s_by_step"] = [round(generate[s], 3) for s in sorted(generate)]
    found["forced_lengths"] = lengths_held(records, logs)
    found["paged_cache_written"] = bool(updates) and updates[-1] > 0
    step_s, found["step_times_from"] = step_times(metrics, records)
    # The first step of a run (kernel compilation, CUDA graphs) is never measured here.
    step_s = {s: t for s, t in step_s.items() if s > 0 and s in generate and t > 0}
    if step_s:
        gen = [generate[s] for s in step_s]
        found.update(
            steps_measured=len(step_s),
            steps_per_second=round(1 / statistics.median(step_s.values()), 4),
            step_time_s=round(statistics.median(step_s.values()), 3),
            generation_s=round(statistics.median(gen), 3),
            generation_share=round(statistics.median(generate[s] / t for s, t in step_s.items()), 3),
            generation_tokens_per_second=round(sum(tokens.get(s, 0) for s in step_s) / sum(gen), 1),
            breakdown_s=breakdown(step_s, generate, prepare, rewards),
        )
    peaks = metrics.get("peak_memory_gib") or []
    if peaks:
        found["peak_memory_gib"] = [max(p.values()) for p in peaks]
        found["peak_memory_is"] = "host RSS (CPU)" if tiny else "torch's peak allocation on the GPU"
    found["rewards"] = [r for _, r in metrics.get("rewards", [])]
    found["versions"] = metrics.get("versions")
    return found


def step_times(metrics: dict, records: list[dict]) -> tuple[dict[int, float], str]:
    """Seconds of each step (0-based), from the training program's metrics.json (its step_times_s: the steps after
    the warm-up ones), or, for a run ended at the deadline (whose metrics.json holds no times), from the probe:
    from the start of one step's batch preparation to the next one's."""
    times = metrics.get("step_times_s")
    if times:
        first = metrics["steps"] - len(times)
        return {first + i: t for i, t in enumerate(times)}, "metrics.json"
    starts: dict[int, float] = {}
    for r in records:
        if r["rank"] == 0 and r["event"] == "timed" and r["name"].endswith("._prepare_inputs"):
            starts[r["step"]] = min(starts.get(r["step"], math.inf), r["time"] - r["seconds"])
    return {s: starts[s + 1] - starts[s] for s in starts if s + 1 in starts}, "the probe (no metrics.json times)"


def breakdown(step_s: dict[int, float], generate: dict, prepare: dict, rewards: dict) -> dict[str, float]:
    """Median seconds per measured step of each part of it."""
    parts = {
        "generation": [generate[s] for s in step_s],
        "rewards": [rewards.get(s, 0.0) for s in step_s],
        "rest_of_preparing": [prepare.get(s, 0.0) - generate[s] - rewards.get(s, 0.0) for s in step_s],
        "training": [t - prepare.get(s, 0.0) for s, t in step_s.items()],
    }
    return {name: round(statistics.median(values), 3) for name, values in parts.items()}


def against_plan(entry: dict) -> None:
    """The peak beside the planner's per-GPU estimate, less the CUDA context it adds (torch's peak excludes it)."""
    estimate, peaks = entry.get("plan_estimate_gib"), entry.get("peak_memory_gib")
    if estimate is None or not peaks or "GPU" not in entry.get("peak_memory_is", ""):
        return
    without_context = estimate - 1.0  # entrypoint/memory.py's CUDA_OVERHEAD_GIB
    entry["plan_estimate_without_context_gib"] = round(without_context, 2)
    entry["peak_over_estimate"] = round(max(peaks) / without_context, 3)


def merge(out: Path, runs: list[dict], extra: dict) -> None:
    """Runs are keyed by model, mode, GPUs and generation: a later invocation replaces the same run only."""
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}

    def key(e):
        return (e["model"], e["mode"], e["num_gpus"], e["generation"])

    replaced = {key(e) for e in runs}
    data["runs"] = [e for e in data["runs"] if key(e) not in replaced] + runs
    data.update(extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def build_in_background(bench: Bench) -> tuple[threading.Thread, dict]:
    """The model is built by a process of its own while the tiny recipe trains."""
    built: dict = {}

    def build() -> None:
        argv = [__file__, "--prepare", bench.kind["shape"], "--work", str(bench.work)]
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=bench.env(), timeout=1200)
        built["seconds"] = round(time.time() - started, 1)
        if done.returncode != 0:
            built["error"] = (done.stdout + done.stderr)[-3000:]
        else:
            built["paths"] = json.loads(done.stdout.strip().splitlines()[-1])

    started = time.time()
    thread = threading.Thread(target=build)
    thread.start()
    return thread, built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results (runs merged with those there)")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU: checks this script")
    parser.add_argument("--generations", default=",".join(GENERATIONS))
    parser.add_argument("--steps", type=int, help="training steps per run (default: 7; --tiny: 3)")
    parser.add_argument("--mode", default="single", help="PARALLELISM for the runs (single, ddp)")
    parser.add_argument("--num-gpus", type=int, default=1, help="NUM_GPUS for the runs")
    parser.add_argument("--no-reward-run", action="store_true", help="leave out the tiny recipe's reward run")
    parser.add_argument("--work", default="/tmp/unsloth-recipes-grpo")
    parser.add_argument("--logs", help="folder for each run's log (default: WORK/logs)")
    parser.add_argument("--deadline-s", type=float, default=3600, help="start nothing that would end after this")
    parser.add_argument("--grace-s", type=float, default=30, help="a run may outlive the deadline by this much")
    parser.add_argument("--prepare", metavar="SHAPE", help=argparse.SUPPRESS)  # build one model, print its paths
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps([str(p) for p in prepare(args.prepare, Path(args.work))]))
        return 0
    if not args.out:
        parser.error("--out is required")
    args.steps = args.steps or (TINY if args.tiny else FULL)["steps"]
    return run_all(Bench(args), Path(args.out))


def run_all(bench: Bench, out: Path) -> int:
    args = bench.args
    command = " ".join(["python3", "bench/grpo.py", *map(shlex.quote, sys.argv[1:])])
    thread, built = build_in_background(bench)
    extra: dict = {"command": command, "machine": gpuhost.machine(args.tiny), "not_run": []}
    if not args.no_reward_run:
        extra["reward_run"] = bench.reward_run()
    thread.join()
    extra["model_build_s"] = built.get("seconds")
    if "error" in built:
        merge(out, [], {**extra, "error": built["error"]})
        print(built["error"], file=sys.stderr)
        return 1
    model, data = (Path(p) for p in built["paths"])
    extra["shape"] = json.loads((model / "config.json").read_text())
    runs = []
    for generation in args.generations.split(","):
        if bench.remaining() < RUN_GUESS_S[bench.kind["shape"]]:
            extra["not_run"].append(f"{generation}: {bench.remaining():.0f} s left before the deadline")
            continue
        entry = bench.measure(generation, model, data)
        against_plan(entry)
        runs.append(entry)
        shown = ("generation", "exit_status", "steps_per_second", "generation_share", "generation_tokens_per_second")
        print(json.dumps({k: entry.get(k) for k in shown}), flush=True)
        merge(out, runs, extra)  # kept even if a later run is cut short
    extra["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    merge(out, runs, extra)
    return 0 if runs and all(r["exit_status"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
