"""The per-process training program. Started by the launcher, once per process:

    python -m trainer --recipe RESOLVED.yaml --mode single|model --mixed-precision bf16
    accelerate launch --config_file ... -m trainer --recipe RESOLVED.yaml --mode ddp|fsdp ...

It reads top to bottom in phases:
  prepare   the recipe, this process's place in the launch (refusing the trap), the output
            folder and the checkpoint to resume from; a bad recipe exits 2 before anything loads
  data      every row checked and shaped for the method, evaluation rows held out (trainer/data.py)
  load      the model with the placement the mode needs, and LoRA (trainer/models.py)
  trainer   the method's TRL trainer (trainer/methods.py), progress and preemption callbacks
  train     resuming from the newest checkpoint, evaluating at the start, every eval_steps and at
            the end; SIGTERM stops every rank at one step
  save      the adapter (or model), from the main process (trainer/save.py)
  export    merged / GGUF exports, from the main process alone (trainer/export.py)
  metrics   metrics.json, from the main process
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipes import atomic, catalog, exports, modes
from recipes.errors import EXIT_BAD_INPUT, BadInput
from recipes.modes import FSDP_SWITCH, SPECS, TRAP_EXPLAINED, Mode
from recipes.runs import Run
from recipes.schema import Recipe
from trainer import data, export, models, preemption, progress, save
from trainer.checkpoints import fix_cpu_ddp_resume, newest_checkpoint
from trainer.methods import make_trainer

STARTED = time.time()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__)
    parser.add_argument(
        "--recipe", required=True, help="recipe name or YAML file (the launcher passes the resolved one)"
    )
    parser.add_argument("--mode", choices=modes.MODES, default="single")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Job:
    """What this process was asked to do, and where it sits in the launch."""

    recipe: Recipe
    mode: Mode
    precision: str
    world_size: int
    local_rank: int
    out: Path
    resume: str | None  # the checkpoint to resume from


# ---- prepare


def check_mode(mode: Mode, world_size: int) -> None:
    """Balanced placement under a multi-process launch fails deep inside accelerate, and FSDP2
    with one process has nothing to shard over: stop first."""
    if world_size < SPECS[mode].min_processes:
        raise modes.too_few_processes(
            f"--mode {mode}",
            f"WORLD_SIZE={world_size}",
            f"start it with accelerate launch over {SPECS[mode].min_processes} or more processes "
            f"(PARALLELISM={mode} does)",
            "--mode single",
        )
    if SPECS[mode].placement == "balanced" and world_size > 1:
        raise BadInput(
            f"--mode {mode} refused: WORLD_SIZE={world_size}, so this is one of {world_size} processes of a "
            f"multi-process launch, and {TRAP_EXPLAINED}. Start it as one plain process "
            f"(PARALLELISM={mode}), or use PARALLELISM=ddp"
        )


def prepare(args: argparse.Namespace) -> Job:
    recipe = catalog.load(args.recipe, args.overrides).recipe
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_mode(args.mode, world_size)
    modes.refuse_fsdp_switch(args.mode, os.environ.get(FSDP_SWITCH))
    exports.check_possible(recipe, os.environ)
    out = catalog.output_dir(recipe, os.environ.get("OUTPUTS_DIR"), os.getcwd()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    resume = newest_checkpoint(out / "checkpoints", recipe.training.max_steps) if recipe.output.resume else None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Job(recipe, args.mode, args.mixed_precision, world_size, local_rank, out, resume)


def import_stack(job: Job) -> bool:
    """Import torch and Unsloth in the order they need; returns whether CUDA is there.

    The mode's variables (fsdp's UNSLOTH_FSDP2) are read at `import unsloth`. A rank of a
    multi-process launch selects its own GPU first: Unsloth's import touches the current device,
    which would otherwise be cuda:0 on every rank (a context there that rank 0's GPU pays for).
    Unsloth patches transformers, TRL and PEFT at import, so it comes before them.
    """
    os.environ.update(SPECS[job.mode].child_env)
    import torch

    cuda = torch.cuda.is_available()
    if cuda and SPECS[job.mode].multi_process:
        torch.cuda.set_device(job.local_rank)
    import unsloth  # noqa: F401

    return cuda


# ---- trainer, train


def build_trainer(job: Job, model, tokenizer, dataset, eval_dataset):
    """The method's trainer, with progress recorded and SIGTERM handled; (trainer, recorder, stopper)."""
    record = progress.make_recorder(job.world_size)
    trainer = make_trainer(job.recipe, model, tokenizer, dataset, eval_dataset, job.out, job.precision, [record])
    record.counter = progress.count_tokens(trainer)
    stopper = preemption.make_callback(job.world_size)
    trainer.add_callback(stopper)
    stopper.install()
    fix_cpu_ddp_resume(trainer)
    return trainer, record, stopper


def train(job: Job, trainer, record, stopper, evaluating: bool):
    """Train; with evaluation rows the trainer evaluates first (eval_on_start: the baseline, or
    where a resumed run starts) and every eval_steps; here, last (unless the last step just did).
    Every rank calls evaluate: under ddp each evaluates its share."""
    from accelerate.utils import gather_object

    if job.resume and trainer.accelerator.is_main_process:
        print(f"resuming from {job.resume} (output.resume=false starts fresh)", flush=True)
    result = trainer.train(resume_from_checkpoint=job.resume)
    # What each rank holds while it trains: all of it under ddp, its shard under fsdp.
    record.held = gather_object([save.local_elements(trainer.model)])
    stopped = stopper.stopped_at is not None
    last = trainer.state.global_step
    if evaluating and not stopped and not (record.eval_losses and record.eval_losses[-1][0] == last):
        trainer.evaluate()
    return result


# ---- save, metrics


def save_and_measure(job: Job, trainer, tokenizer, record) -> dict[str, Any]:
    """Every rank: gather what the metrics need, save from the main process; -> the measurements."""
    from accelerate.utils import gather_object

    full = job.recipe.model.full_finetuning
    measured = {
        "trainable_elements_per_rank": record.held,
        "peak_memory_gib": gather_object([progress.peak_memory_gib()]),
        # Counted in the collator; GRPO's batches are raw prompts, so there TRL's own count serves.
        "tokens": sum(gather_object([record.counter.tokens])) or record.logged_tokens,
        "saved": str(job.out / ("model" if full else "adapter")),
    }
    # Under fsdp every rank enters while the shards are gathered to rank 0 (for an adapter, only
    # the trainable weights); otherwise every rank already holds whole weights.
    with save.whole_parameters(trainer.model, trainable_only=not full) as whole:
        # Each rank that holds whole weights hashes them: ddp ranks must agree; fsdp has one copy.
        fingerprints = gather_object([save.trainable_fingerprint(trainer.model) if whole else None])
        measured["trainable_fingerprints"] = [f for f in fingerprints if f is not None]
        if trainer.accelerator.is_main_process:
            save.save_trained(trainer.model, tokenizer, Path(measured["saved"]))
    return measured


def export_trained(job: Job) -> list[str]:
    """output.save's merged / GGUF exports, from the saved adapter, in this process alone."""
    quants = exports.recipe_quants(job.recipe)
    targets = [(kind, quants if kind == "gguf" else ()) for kind in job.recipe.output.save if kind != "adapter"]
    if not targets:
        return []
    run = Run(job.out, job.recipe, trained=job.out / "adapter", checkpoint=None)
    records = export.export_run(run, targets, exports.llama_cpp_folder(os.environ))
    return list(dict.fromkeys(str(job.out / kind) for kind, _ in targets if any(r["kind"] == kind for r in records)))


def write_metrics(job: Job, trainer, result, record, measured: dict[str, Any], cuda: bool) -> None:
    wall = time.time() - STARTED
    runtime = float(result.metrics.get("train_runtime", 0.0))
    launcher_t0 = float(os.environ.get("ENTRYPOINT_STARTED_AT", STARTED))
    steady = record.summary(launcher_t0)
    metrics = {
        "recipe": job.recipe.name,
        "mode": job.mode,
        "world_size": job.world_size,
        "device": "cuda" if cuda else "cpu",
        "steps": trainer.state.global_step,
        **{k: steady[k] for k in ("first_loss", "final_loss", "losses", "eval_loss", "eval_losses", "rewards")},
        "train_runtime_s": round(runtime, 3),
        "tokens": measured["tokens"],
        "tokens_per_second": round(measured["tokens"] / runtime, 1) if runtime else None,
        **{
            k: steady[k]
            for k in (
                "steady_tokens_per_second",
                "step_time_s",
                "time_to_first_step_s",
                "steps_measured",
                "step_times_s",
                "step_tokens",
            )
        },
        "wall_time_s": round(wall, 3),
        "peak_memory_gib": measured["peak_memory_gib"],
        "trainable_elements_per_rank": measured["trainable_elements_per_rank"],
        "trainable_fingerprints": measured["trainable_fingerprints"],
        "resumed_from": job.resume,
        "saved": measured["saved"],
        "exported": measured["exported"],
        "versions": {
            name: __import__(name).__version__
            for name in ("unsloth", "torch", "transformers", "trl", "peft", "accelerate")
        },
    }
    atomic.write_text(job.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    losses = steady["losses"]
    loss_text = f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}" if losses else "no loss logged"
    print(
        f"done: {job.recipe.name} [{job.mode} x{job.world_size}] {metrics['steps']} steps, {loss_text}, "
        f"{metrics['tokens_per_second']} tokens/s, {wall:.1f}s; saved {measured['saved']}",
        flush=True,
    )


def preempted(job: Job, trainer, record, step: int) -> int:
    """SIGTERM: the checkpoint of this step is saved; note it and exit 143 like a terminated process."""
    if trainer.accelerator.is_main_process:
        checkpoint = job.out / "checkpoints" / f"checkpoint-{step}"
        stopped = {
            "recipe": job.recipe.name,
            "interrupted": "SIGTERM",
            "steps": step,
            "checkpoint": str(checkpoint),
            "losses": record.losses,
            "wall_time_s": round(time.time() - STARTED, 3),
        }
        atomic.write_text(job.out / "metrics.json", json.dumps(stopped, indent=2) + "\n")
        print(f"preempted: saved {checkpoint}; run the same recipe again to resume from it", flush=True)
    return preemption.EXIT_PREEMPTED


def close(trainer) -> None:
    import torch

    trainer.accelerator.wait_for_everyone()
    # Left to interpreter shutdown, gloo's threads can abort the process ("terminate called
    # without an active exception") after a successful run; close the group while all ranks live.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- the program


def run(args: argparse.Namespace) -> int:
    job = prepare(args)
    cuda = import_stack(job)
    # Data before the model: a bad row must stop the run before minutes of model loading.
    dataset, eval_dataset = data.build(job.recipe.data, job.recipe.training.seed)
    model_name = models.resolve_model(job.recipe, dataset, job.out)
    models.check_chat_template(job.recipe, model_name)
    model, tokenizer = models.load(job.recipe, model_name, SPECS[job.mode].device_map(cuda, job.local_rank))
    trainer, record, stopper = build_trainer(job, model, tokenizer, dataset, eval_dataset)
    result = train(job, trainer, record, stopper, evaluating=eval_dataset is not None)
    if stopper.stopped_at is not None:
        status = preempted(job, trainer, record, stopper.stopped_at)
        close(trainer)
        return status
    measured = save_and_measure(job, trainer, tokenizer, record)
    main_process = trainer.accelerator.is_main_process
    close(trainer)  # the other ranks are done; exports need no collective
    if main_process:
        measured["exported"] = export_trained(job)
        write_metrics(job, trainer, result, record, measured, cuda)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        status = run(parse_args(argv))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every output is written and closed and the process group destroyed. Under load, a rank's
        # interpreter teardown can still abort in a native thread's destructor ("terminate called
        # without an active exception", SIGABRT), failing a finished job; leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
