"""Several GPUs through the real launcher: the same recipe in single, ddp, fsdp and model mode over
N GPUs, the model parallel run of a model no single GPU holds, and faults under NCCL.

    python bench/multigpu.py --out docs/benchmarks/multigpu-h100.json                 # the whole matrix
    python bench/multigpu.py --out ... --schedule "1b-16bit-single; 8b-4bit-single; 1b-16bit-ddp2|8b-4bit-ddp2"
    python bench/multigpu.py --out ... --schedule "70b-16bit-auto2|faults; 70b-16bit-auto4"
    python bench/multigpu.py --out ... --schedule big --models /dev/shm/models        # a model no GPU holds
    python bench/multigpu.py --tiny --out /tmp/multigpu-cpu.json     # checks the benchmark itself on the CPU
    python bench/multigpu.py --tiny --schedule big --out /tmp/big-cpu.json

Every run is a fresh `python -m entrypoint run RECIPE` with PARALLELISM, NUM_GPUS and
CUDA_VISIBLE_DEVICES set as a user would, after `python -m entrypoint plan RECIPE --json` with the
same environment (the planner's per-GPU estimate and its choice under `auto`). A job is
MODEL-LOAD-MODE[N]: a shape of bench/settings.py, 16bit or 4bit LoRA or full fine-tuning, and single, ddp, fsdp,
model or auto over N GPUs; a trailing `*` leaves CUDA_VISIBLE_DEVICES unset (NUM_GPUS alone picks
the GPUs); `faults` is SIGTERM under ddp and fsdp (checkpoint, exit 143, resume) and a killed
rank, on two GPUs. The schedule is waves separated by `;`, each wave lanes separated by `|` that
run side by side on disjoint GPUs (in order from GPU 0), each lane jobs separated by `,` that run
one after another. Run the single-GPU baselines alone: a 1B step is bound by the host, and beside
other runs loading their models it took twice as long. Each result is merged into --out as soon as
its job ends; `bench/multigpu_report.py` turns them into a table and a chart.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gpuhost
import settings
import throughput
from gpuhost import NVLS_OFF, machine, smi, tail

from entrypoint import gpus as inventory
from entrypoint import memory

ROOT = settings.ROOT
MARKER = "BENCH_RUN_ID"  # in every process of a run, so its ranks can be found in /proc and nvidia-smi
LAUNCHER_VARIABLES = ("PARALLELISM", "NUM_GPUS", "CPU_PROCESSES", "ALLOW_CPU", "CUDA_VISIBLE_DEVICES", "OUTPUTS_DIR")
STEPS = {"tiny": 10, "1b": 30, "8b": 20, "70b": 10}  # the first progress.WARMUP_STEPS are not measured
BATCH = {"70b": 1, "tiny": 2}  # the 70B recipe's per-device batch; the others use settings.BATCH
TINY_SEQ_LEN = 256  # the tiny shape checks this script on a CPU: 2048-token steps take minutes there
# The tokenizers are trained on rows for 40 steps on 4 GPUs; each run reads only the rows it
# trains on, since every rank tokenizes the whole file before its first step.
DATA_STEPS = 160
# Seconds a job takes, for the deadline, until one of its kind has run here.
GUESS_S = {"tiny": 60, "1b": 80, "8b": 100, "70b": 360, "faults": 150}
JOB = re.compile(
    r"^(?P<model>[a-z0-9]+)-(?P<load>16bit|4bit|full)-(?P<mode>single|ddp|fsdp|model|auto)(?P<n>\d*)(?P<all>\*?)$"
)


@dataclass(frozen=True)
class Job:
    token: str
    mode: str  # single, ddp, fsdp, model, auto, or faults
    n: int  # GPUs (CPU processes with --tiny)
    model: str = ""
    load: str = ""
    pinned: bool = True  # CUDA_VISIBLE_DEVICES names the lane's GPUs


def parse_job(token: str) -> Job:
    if token == "faults":
        return Job(token, "faults", 2)
    match = JOB.match(token)
    if not match or match["model"] not in settings.SHAPES:
        shapes = ", ".join(settings.SHAPES)
        raise SystemExit(f"bad job {token!r}: write MODEL-LOAD-MODE[N] like 8b-4bit-ddp2 (models: {shapes})")
    n = int(match["n"] or 1)
    if match["mode"] == "single" and n != 1:
        raise SystemExit(f"bad job {token!r}: single runs on one GPU")
    return Job(token, match["mode"], n, match["model"], match["load"], pinned=not match["all"])


def parse_schedule(text: str) -> list[list[list[Job]]]:
    return [
        [[parse_job(t.strip()) for t in lane.split(",") if t.strip()] for lane in wave.split("|") if lane.strip()]
        for wave in text.split(";")
        if wave.strip()
    ]


def big_schedule(gpu_count: int, tiny: bool) -> str:
    """`--schedule big`: a model no GPU holds (the 70B-class shape, bf16 LoRA) sharded with fsdp, then
    split with model, over the same GPUs; then full fine-tuning of 8B on one GPU and sharded with fsdp.
    Each run records what auto would choose there (from plan, with the same environment). With --tiny
    the tiny shape stands in; model parallel needs GPUs, so it is recorded as not run."""
    model, full = ("tiny", "tiny") if tiny else ("70b", "8b")
    n = max(gpu_count, 2) if tiny else gpu_count
    return f"{model}-16bit-fsdp{n}; {model}-16bit-model{n}; {full}-full-single; {full}-full-fsdp{n}"


def default_schedule(gpu_count: int, tiny: bool) -> str:
    """Single on every combination, each alone, then ddp and fsdp over 2, 4, ... GPUs side by side on
    disjoint GPUs, then model over 2. Singles are the baseline of every ratio, and a 1B step (0.2 s,
    bound by the host) ran at half speed beside other runs loading their models (4 x H200)."""
    combos = ["tiny-16bit"] if tiny else ["1b-16bit", "8b-4bit", "1b-4bit", "8b-16bit"]
    width = max(gpu_count, 2) if tiny else gpu_count  # CPU processes are not GPUs: any count
    jobs = [(f"{c}-single", 1) for c in combos]
    n = 2
    while n <= width:
        jobs += [(f"{c}-{mode}{n}", n) for mode in ("ddp", "fsdp") for c in combos]
        n *= 2
    if not tiny and gpu_count >= 2:
        jobs += [(f"{c}-model2", 2) for c in combos[:2]]
    waves, wave, used = [], [], 0
    for token, need in jobs:
        if used + need > width or (wave and need != wave[0][1]) or (wave and token.endswith("-single")):
            waves.append(wave)
            wave, used = [], 0
        wave.append((token, need))
        used += need
    waves.append(wave)
    return "; ".join(" | ".join(token for token, _ in w) for w in waves)


def environ_of(pid: int | str) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def processes_of(run_id: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process started for this run (the launcher's and its children)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            env = environ_of(entry.name)
            if env.get(MARKER) == run_id:
                found[int(entry.name)] = env
    return found


def ranks_of(run_id: str) -> dict[str, int]:
    """LOCAL_RANK -> pid of the run's training processes."""
    ranks = {}
    for pid, env in processes_of(run_id).items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"trainer" in cmdline.split(b"\0") and "LOCAL_RANK" in env:
            ranks[env["LOCAL_RANK"]] = pid
    return ranks


class GpuWatch(threading.Thread):
    """Samples nvidia-smi's compute processes once a second: which GPUs each rank of each run held
    a CUDA context on (torch's peak counts only its allocator; a context alone is ~0.5 GiB)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.index = {uuid: index for index, uuid in smi("--query-gpu=index,uuid")}
        self.seen: dict[str, dict[str, dict[str, float]]] = {}  # run -> rank -> GPU index -> max MiB
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for uuid, pid, used in smi("--query-compute-apps=gpu_uuid,pid,used_memory"):
                env = environ_of(pid)
                if MARKER not in env:
                    continue
                ranks = self.seen.setdefault(env[MARKER], {})
                held = ranks.setdefault(env.get("LOCAL_RANK", "main"), {})
                gpu = self.index.get(uuid, uuid)
                with contextlib.suppress(ValueError):
                    held[gpu] = max(held.get(gpu, 0.0), float(used))
            self.samples += 1
            self.halt.wait(1.0)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        self.work = Path(args.work)
        self.models_dir = Path(args.models) if args.models else self.work / "models"
        self.runs_dir = self.work / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.gpus = [] if self.tiny else inventory.discover({})
        self.started = time.time()
        self.serial = 0
        self.lock = threading.Lock()
        self.model_locks = {name: threading.Lock() for name in settings.SHAPES}  # one build per shape
        self.prepared: dict[str, tuple[Path, Path]] = {}
        self.durations: dict[str, float] = {}
        self.out = Path(args.out)

    # -- environments and processes ---------------------------------------------------------------

    def env(self, run_id: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        env.setdefault("HF_HUB_OFFLINE", "1")  # local models only; also skips Unsloth's statistics download
        path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return {**env, **NVLS_OFF, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", MARKER: run_id, **extra}

    def job_env(self, job: Job, gpu_ids: list[str], run_id: str) -> dict[str, str]:
        mode = job.mode if job.mode != "faults" else "ddp"
        if self.tiny:
            extra = {"PARALLELISM": mode, "ALLOW_CPU": "1"}
            if job.n > 1:
                extra["CPU_PROCESSES"] = str(job.n)
            return self.env(run_id, **extra)
        extra = {"PARALLELISM": mode, "NUM_GPUS": str(job.n)}
        if job.pinned:
            extra["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        return self.env(run_id, **extra)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as handle:
            # Its own session, so that a run past the deadline can be ended without touching ours.
            return subprocess.Popen(
                [sys.executable, "-m", "entrypoint", *argv],
                cwd=self.work,  # one Unsloth compile cache (./unsloth_compiled_cache) for every run
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def finish(self, proc: subprocess.Popen, run_id: str, timeout: float) -> int | None:
        """The exit status, or None after ending a run that outlived `timeout`."""
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to every rank
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for pid in processes_of(run_id):  # only this run's processes, by id
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
        return None

    def remaining(self) -> float:
        return self.args.deadline_s - (time.time() - self.started)

    def new_id(self, token: str, gpu_ids: list[str]) -> str:
        with self.lock:
            self.serial += 1
            stamp = datetime.datetime.now(datetime.UTC).strftime("%H%M%S")
            return f"{token.rstrip('*')}-g{''.join(gpu_ids) or 'cpu'}-{stamp}-{self.serial}"

    def command_text(self, env: dict[str, str], argv: list[str]) -> str:
        names = ("PARALLELISM", "NUM_GPUS", "CPU_PROCESSES", "CUDA_VISIBLE_DEVICES")
        shown = [f"{k}={env[k]}" for k in names if k in env]
        return " ".join([*shown, "python -m entrypoint", *map(shlex.quote, argv)])

    # -- training runs ----------------------------------------------------------------------------

    def prepare(self, model: str, rows: int) -> tuple[Path, Path]:
        """-> (model folder, a data file of the first `rows` rows)."""
        with self.model_locks[model]:
            if model not in self.prepared:
                started = time.time()
                # In a process of its own: building draws the weights on the GPUs, and the memory
                # torch's allocator keeps cached would stay held here, beside every run.
                argv = [__file__, "--prepare", model, "--work", str(self.work), "--models", str(self.models_dir)]
                done = subprocess.run(
                    [sys.executable, *argv],
                    capture_output=True,
                    text=True,
                    env=self.env("prepare"),
                    timeout=max(self.remaining() + self.args.grace_s, 60),
                )
                if done.returncode != 0:
                    raise RuntimeError(f"building {model} failed:\n{(done.stdout + done.stderr)[-3000:]}")
                folder, full = json.loads(done.stdout.strip().splitlines()[-1])
                self.prepared[model] = (Path(folder), Path(full))
                print(f"== built {model} in {time.time() - started:.0f} s: {folder}", flush=True)
            folder, full = self.prepared[model]
            data = self.work / f"synthetic-first-{rows}.jsonl"
            if not data.exists():
                lines = full.read_text().splitlines(keepends=True)
                data.write_text("".join(lines[:rows]))
            return folder, data

    def plan(self, recipe: Path, overrides: list[str], env: dict[str, str]) -> dict:
        return gpuhost.plan([str(recipe), *overrides], env, self.work)

    def train(self, job: Job, gpu_ids: list[str]) -> dict:
        run_id = self.new_id(job.token, gpu_ids)
        steps = STEPS[job.model]
        batch = BATCH.get(job.model, settings.BATCH)
        model, data = self.prepare(job.model, steps * batch * job.n + 16)
        out = self.runs_dir / run_id
        recipe = self.runs_dir / f"{run_id}.yaml"
        recipe.write_text(throughput.recipe_for(job.model, job.load, model, data, steps, out))
        overrides = [f"training.per_device_batch_size={batch}"] if batch != settings.BATCH else []
        seq_len = TINY_SEQ_LEN if self.tiny else settings.SEQ_LEN
        if self.tiny:
            overrides.append(f"model.max_seq_length={seq_len}")
        env = self.job_env(job, gpu_ids, run_id)
        entry = {
            "id": run_id,
            "kind": "train",
            "job": job.token,
            "model": job.model,
            "load": job.load,
            "mode": job.mode,
            "num_gpus": job.n,
            "gpu_ids": gpu_ids if job.pinned or self.tiny else None,
            "steps": steps,
            "batch": batch,
            "seq_len": seq_len,
        }
        plan = self.plan(recipe, overrides, env)
        entry["plan"] = {k: plan.get(k) for k in ("mode", "reason", "gpu_ids", "num_processes", "device_map", "error")}
        if "memory" in plan:
            entry["estimate_gib"] = plan["memory"]["per_gpu_gib"]
            entry["estimate_at_load_gib"] = plan["memory"].get("load_per_gpu_gib")
            entry["one_gpu_estimate_gib"] = plan["memory"]["total_gib"]
            one = self.gpus[int(gpu_ids[0])].memory_gib if self.gpus and gpu_ids else None
            entry["gpu_memory_gib"] = one
            entry["fits_one_gpu"] = memory.fits(plan["memory"]["total_gib"], one) if one else None
        if job.mode == "auto" and not self.tiny:
            # What auto picks when NUM_GPUS does not pin the count: the fewest GPUs whose share fits.
            unpinned = {k: v for k, v in env.items() if k not in ("NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
            free = self.plan(recipe, overrides, unpinned)
            entry["auto_without_num_gpus"] = {k: free.get(k) for k in ("mode", "reason", "gpu_ids", "error")}
        elif job.mode != "auto":
            # What auto would choose on the same GPUs: no run of its own needed.
            auto = self.plan(recipe, overrides, {k: v for k, v in env.items() if k != "PARALLELISM"})
            entry["auto_plan"] = {k: auto.get(k) for k in ("mode", "reason", "gpu_ids", "error")}
            entry["auto_plan"]["per_gpu_gib"] = auto.get("memory", {}).get("per_gpu_gib")
        if self.tiny and job.mode == "model":
            entry["not_run"] = "model parallel splits a model over GPUs; --tiny runs on the CPU"
            return entry
        argv = ["run", str(recipe), *overrides]
        entry["command"] = self.command_text(env, argv)
        log = out.parent / f"{run_id}.log"
        started = time.time()
        entry["started_at"] = round(started, 1)  # to tell which runs' start-ups overlapped which steps
        proc = self.start(argv, env, log)
        status = self.finish(proc, run_id, self.remaining() + self.args.grace_s)
        entry["wall_s"] = round(time.time() - started, 1)
        entry["exit_status"] = status
        metrics_file = out / "metrics.json"
        if status != 0 or not metrics_file.exists():
            entry["error"] = tail(log)
            return entry
        entry.update(summarize(json.loads(metrics_file.read_text()), job, self.tiny))
        with self.lock:
            self.durations[job.model] = max(self.durations.get(job.model, 0.0), entry["wall_s"])
        return entry

    # -- faults -----------------------------------------------------------------------------------

    def faults(self, job: Job, gpu_ids: list[str]) -> list[dict]:
        """The three scenarios at once on the lane's GPUs: tiny runs, so sharing GPUs costs nothing."""
        results: list[dict] = []
        scenarios = [(self.sigterm, "ddp"), (self.sigterm, "fsdp"), (self.killed_rank, "ddp")]
        threads = [threading.Thread(target=lambda f=f, m=m: results.append(f(m, job, gpu_ids))) for f, m in scenarios]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self.lock:
            self.durations["faults"] = max(self.durations.get("faults", 0.0), time.time() - started)
        return results

    def fault_run(self, name: str, mode: str, job: Job, gpu_ids: list[str]) -> tuple[str, dict[str, str], Path]:
        run_id = self.new_id(f"{name}-{mode}", gpu_ids)
        outputs = self.runs_dir / run_id
        env = self.job_env(Job(job.token, mode, 2), gpu_ids, run_id) | {"OUTPUTS_DIR": str(outputs)}
        return run_id, env, outputs

    def wait_for_steps(self, log: Path, proc: subprocess.Popen, steps: int = 3, seconds: float = 400) -> None:
        """Until `steps` losses are logged (logging.steps=1): a fixed sleep would signal too early."""
        deadline = time.time() + seconds
        while log.read_text(errors="replace").count("{'loss'") < steps:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before training began")
            if time.time() > deadline:
                raise RuntimeError(f"no {steps} training steps within {seconds} s")
            time.sleep(0.2)

    def sigterm(self, mode: str, job: Job, gpu_ids: list[str]) -> dict:
        run_id, env, outputs = self.fault_run("sigterm", mode, job, gpu_ids)
        out, log = outputs / "smoke", outputs / "launcher.log"
        first = ["run", "smoke", "training.max_steps=20000", "logging.steps=1"]
        entry = {"id": run_id, "kind": "fault", "scenario": f"SIGTERM under {mode}", "mode": mode, "num_gpus": 2}
        entry["gpu_ids"] = gpu_ids
        entry["command"] = self.command_text(env, first) + "; kill -TERM <launcher> after 3 logged steps"
        try:
            proc = self.start(first, env, log)
            self.wait_for_steps(log, proc)
            sent = time.time()
            proc.send_signal(signal.SIGTERM)
            status = self.finish(proc, run_id, 60)
            entry.update(exit_status=status, exit_s=round(time.time() - sent, 2))
            stopped = json.loads((out / "metrics.json").read_text())
            checkpoint = Path(stopped["checkpoint"])
            step = stopped["steps"]
            entry.update(
                interrupted=stopped.get("interrupted"),
                stopped_at_step=step,
                # One RNG file per rank in the one checkpoint: every rank saved at that same step.
                rng_states=sorted(p.name for p in checkpoint.glob("rng_state*")),
            )
            again = ["run", "smoke", f"training.max_steps={step + 10}", "logging.steps=5"]
            entry["resume_command"] = self.command_text(env, again)
            resumed_status = self.finish(self.start(again, env, log), run_id, 400)
            resumed = json.loads((out / "metrics.json").read_text())
            entry.update(
                resume_exit_status=resumed_status,
                resumed_from=resumed.get("resumed_from"),
                resumed_steps=resumed.get("steps"),
                resumed_losses=resumed.get("losses"),
            )
            entry["ok"] = (
                status == 143
                and entry["exit_s"] < 30
                and entry["interrupted"] == "SIGTERM"
                and entry["rng_states"] == ["rng_state_0.pth", "rng_state_1.pth"]
                and resumed_status == 0
                and entry["resumed_from"] == str(checkpoint)
                and entry["resumed_steps"] == step + 10
                and all(s > step for s, _ in resumed["losses"])
            )
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            entry.update(ok=False, error=f"{exc}\n{tail(log)}")
        return entry

    def killed_rank(self, mode: str, job: Job, gpu_ids: list[str]) -> dict:
        run_id, env, outputs = self.fault_run("killed-rank", mode, job, gpu_ids)
        log = outputs / "launcher.log"
        argv = ["run", "smoke", "training.max_steps=20000", "training.collective_timeout_s=60", "logging.steps=1"]
        entry = {"id": run_id, "kind": "fault", "scenario": f"rank 1 killed under {mode}", "mode": mode, "num_gpus": 2}
        entry["gpu_ids"] = gpu_ids
        entry["command"] = self.command_text(env, argv) + "; kill -KILL <rank 1> after 3 logged steps"
        try:
            proc = self.start(argv, env, log)
            self.wait_for_steps(log, proc)
            ranks = ranks_of(run_id)
            entry["ranks"] = sorted(ranks)
            killed = time.time()
            os.kill(ranks["1"], signal.SIGKILL)
            status = self.finish(proc, run_id, 180)
            entry.update(exit_status=status, job_ended_s=round(time.time() - killed, 2))
            entry["ranks_left"] = [pid for pid in ranks.values() if Path(f"/proc/{pid}").exists()]
            entry["adapter_written"] = (outputs / "smoke" / "adapter").exists()
            entry["ok"] = (
                status not in (0, None)
                and entry["job_ended_s"] < 60
                and not entry["ranks_left"]
                and not entry["adapter_written"]
            )
        except (RuntimeError, OSError, KeyError) as exc:
            entry.update(ok=False, error=f"{exc}\n{tail(log)}")
        return entry

    # -- waves ------------------------------------------------------------------------------------

    def guess_s(self, job: Job) -> float:
        if self.args.guess_s is not None:
            return self.args.guess_s
        key = "faults" if job.mode == "faults" else job.model
        return self.durations.get(key, GUESS_S.get(key, 120))

    def run_wave(self, wave: list[list[Job]]) -> list[dict]:
        lanes, first = [], 0
        for lane in wave:
            width = max(job.n for job in lane)
            ids = [str(i) for i in range(first, first + width)] if not self.tiny else []
            if not self.tiny and any(not job.pinned for job in lane) and first != 0:
                raise SystemExit(f"a job ending in * takes the first GPUs: put its lane first ({lane})")
            lanes.append((lane, ids))
            first += width
        if not self.tiny and first > len(self.gpus):
            raise SystemExit(f"a wave needs {first} GPUs, {len(self.gpus)} visible: {wave}")
        results: list[dict] = []

        def run_lane(lane: list[Job], ids: list[str]) -> None:
            for job in lane:
                found = self.faults(job, ids) if job.mode == "faults" else [self.train(job, ids)]
                with self.lock:
                    results.extend(found)
                    merge(self.out, found, {})  # kept even if the wave is cut short
                for entry in found:
                    shown = {k: entry.get(k) for k in ("id", "exit_status", "tokens_per_second", "peak_memory_gib")}
                    print(json.dumps({**shown, "ok": entry.get("ok")}), flush=True)

        watch = GpuWatch() if not self.tiny else None
        if watch:
            watch.start()
        threads = [threading.Thread(target=run_lane, args=lane) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if watch:
            watch.stop()
        ids = [e["id"] for e in results]
        for entry in results:
            entry["side_by_side_with"] = [i for i in ids if i != entry["id"]]
            if watch:
                entry["gpu_contexts_mib"] = watch.seen.get(entry["id"], {})
                entry["gpu_watch_samples"] = watch.samples
                isolation(entry)
        return results


def summarize(metrics: dict, job: Job, tiny: bool) -> dict:
    """Throughput as the median and range of the steady steps; peak memory per GPU."""
    per_step = [t / s for t, s in zip(metrics["step_tokens"], metrics["step_times_s"], strict=True) if s > 0]
    peaks = metrics["peak_memory_gib"]  # one dict per rank, keyed by the devices that rank could see
    mode = metrics["mode"]
    per_gpu, foreign = own_gpus(peaks, mode, tiny)
    at_load, _ = own_gpus(metrics["peak_memory_at_load_gib"], mode, tiny)
    host = metrics["peak_host_memory_gib"]  # ru_maxrss per rank: mapped checkpoint pages count too
    return {
        "ran_as": mode,
        "world_size": metrics["world_size"],
        "tokens_per_second": round(statistics.median(per_step), 1) if per_step else None,
        "tokens_per_second_range": [round(min(per_step), 1), round(max(per_step), 1)] if per_step else None,
        "tokens_per_second_steady_mean": metrics["steady_tokens_per_second"],
        "step_time_s": metrics["step_time_s"],
        "step_times_s": metrics["step_times_s"],
        "steps_measured": metrics["steps_measured"],
        "time_to_first_step_s": metrics["time_to_first_step_s"],
        "peak_memory_gib": per_gpu,
        "peak_memory_at_load_gib": at_load,
        "peak_memory_by_rank": peaks,
        "time_to_model_loaded_s": metrics["time_to_model_loaded_s"],
        "peak_host_memory_gib": host,
        "peak_host_memory_at_load_gib": metrics["peak_host_memory_at_load_gib"],
        "host_memory_peak_sum_gib": round(sum(host), 3),  # the ranks of this machine together
        "allocated_on_other_ranks_gpus_gib": foreign,
        "first_loss": metrics["first_loss"],
        "final_loss": metrics["final_loss"],
        "trainable_fingerprints_agree": len(set(metrics["trainable_fingerprints"])) == 1,
        "versions": metrics["versions"],
    }


def own_gpus(peaks: list[dict], mode: str, tiny: bool) -> tuple[list[float], float]:
    """Per GPU, what the rank that owns it peaked at; and the most any rank put on another's GPU."""
    if tiny:
        return [p["cpu"] for p in peaks], 0.0
    if mode in ("ddp", "fsdp"):
        foreign = max((v for r, p in enumerate(peaks) for k, v in p.items() if k != f"cuda:{r}"), default=0.0)
        return [p[f"cuda:{rank}"] for rank, p in enumerate(peaks)], foreign
    return [peaks[0][f"cuda:{i}"] for i in range(len(peaks[0]))], 0.0  # single, model: one process, its GPUs


def isolation(entry: dict) -> None:
    """Did each rank keep to its own GPU (contexts seen by nvidia-smi, allocations seen by torch)?"""
    if entry.get("kind") != "train" or entry.get("exit_status") != 0 or entry.get("ran_as") not in ("ddp", "fsdp"):
        return
    ids = entry["gpu_ids"] or [str(i) for i in range(entry["num_gpus"])]
    seen = entry["gpu_contexts_mib"]
    strays = {rank: sorted(set(gpus) - {ids[int(rank)]}) for rank, gpus in seen.items() if rank.isdigit()}
    entry["ranks_on_other_gpus"] = {rank: gpus for rank, gpus in strays.items() if gpus}
    entry["contexts_seen"] = bool(seen)  # False: nvidia-smi showed no process of this run
    entry["isolated"] = not entry["ranks_on_other_gpus"] and not entry["allocated_on_other_ranks_gpus_gib"]


def merge(out: Path, new: list[dict], extra: dict) -> dict:
    data = json.loads(out.read_text()) if out.exists() else {"runs": []}
    replaced = {e["id"] for e in new}
    data["runs"] = [e for e in data["runs"] if e["id"] not in replaced] + new
    for key, value in extra.items():
        if key == "commands":
            data.setdefault("commands", [])
            data["commands"] += [c for c in value if c not in data["commands"]]
        elif key == "not_run":  # one record per invocation: its command and the waves it skipped
            data.setdefault("not_run", [])
            data["not_run"].append(value)
        else:
            data[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results, merged with what is there")
    parser.add_argument("--schedule", help="waves; lanes | jobs, or big (default: the whole matrix for the GPUs here)")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on the CPU: checks this script")
    parser.add_argument("--work", default="/tmp/unsloth-recipes-multigpu")
    parser.add_argument("--models", help="folder for the model folders (default: WORK/models), e.g. /dev/shm/...")
    parser.add_argument("--deadline-s", type=float, default=3600, help="start no wave that would end after this")
    parser.add_argument("--grace-s", type=float, default=60, help="a run may outlive the deadline by this much")
    parser.add_argument("--guess-s", type=float, help="seconds to assume per job for the deadline (default: measured)")
    parser.add_argument("--prepare", metavar="MODEL", help=argparse.SUPPRESS)  # build one model, print its paths
    args = parser.parse_args()
    if args.prepare:
        models = Path(args.models) if args.models else Path(args.work) / "models"
        print(json.dumps([str(p) for p in settings.prepare(args.prepare, DATA_STEPS, Path(args.work), models)]))
        return 0
    if not args.out:
        parser.error("--out is required")
    bench = Bench(args)
    if not bench.tiny and not bench.gpus:
        raise SystemExit("no GPU visible: use --tiny to check the benchmark on the CPU")
    if args.schedule == "big":
        text = big_schedule(len(bench.gpus), bench.tiny)
    else:
        text = args.schedule or default_schedule(len(bench.gpus), bench.tiny)
    waves = parse_schedule(text)
    out = Path(args.out)
    command = " ".join(["python", "bench/multigpu.py", *map(shlex.quote, sys.argv[1:])])
    merge(out, [], {"machine": machine(bench.tiny), "commands": [command]})
    skipped: list[str] = []
    for number, wave in enumerate(waves, 1):
        names = " | ".join(", ".join(j.token for j in lane) for lane in wave)
        guess = max(sum(bench.guess_s(j) for j in lane) for lane in wave)
        if guess > bench.remaining():
            print(f"== wave {number} skipped (~{guess:.0f} s, {bench.remaining():.0f} s left): {names}", flush=True)
            skipped.append(names)
            continue
        print(f"== wave {number} ({bench.remaining():.0f} s left): {names}", flush=True)
        results = bench.run_wave(wave)
        merge(out, results, {"updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        trained = [e for e in results if e["kind"] == "train" and not e.get("not_run")]
        if trained and all(e.get("exit_status") != 0 for e in trained):
            rest = [" | ".join(", ".join(j.token for j in lane) for lane in w) for w in waves[number:]]
            print(f"== every run of wave {number} failed; stopping", flush=True)
            skipped += rest
            break
    merge(out, [], {"not_run": {"command": command, "waves": skipped}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
