"""The per-process training program. Started by the launcher, once per process:

    python -m trainer --recipe RESOLVED.yaml --mode single|model --mixed-precision bf16
    accelerate launch --config_file ... -m trainer --recipe RESOLVED.yaml --mode ddp|fsdp ...

It reads top to bottom in phases:
  prepare   the recipe, this process's place in the launch (refusing the trap), the output
            folder and the checkpoint to resume from; a bad recipe exits 2 before anything
            loads (trainer/__main__.py, before the stack is imported)
  data      every row checked and shaped for the method, the sources mixed, evaluation rows held out
            (trainer/data.py); once per machine, kept in the cache volume (trainer/prepare.py)
  load      the model with the placement the mode needs, and LoRA (trainer/models.py); then the
            rows SFTTrainer tokenizes are tokenized, once per machine and kept as well
  trainer   the method's TRL trainer (trainer/methods.py), progress and preemption callbacks
  train     resuming from the newest checkpoint, evaluating at the start, every eval_steps and at
            the end; SIGTERM stops every rank at one step
  save      the adapter (or model), from the main process (trainer/save.py)
  export    merged / GGUF exports, from the main process alone (trainer/export.py)
  metrics   metrics.json, from the main process
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import time
from typing import TYPE_CHECKING, Any

import accelerate
import peft
import torch
import transformers
import trl
import unsloth
from accelerate.utils import gather_object

from recipes import atomic, exports
from recipes.modes import SPECS
from trainer import checkpoints, export, models, preemption, prepare, progress, random_model, save
from trainer.methods import generation_used, make_trainer

if TYPE_CHECKING:  # the entry module (python -m trainer) makes the Job; importing it would run it again
    from trainer.__main__ import Job

M_MMAP_THRESHOLD = -3  # mallopt(3)
VERSIONS = {"unsloth": unsloth, "torch": torch, "transformers": transformers, "trl": trl, "peft": peft,
            "accelerate": accelerate}  # fmt: skip


# ---- load


def before_a_sharded_load(job: Job, cuda: bool) -> None:
    """The process group, as TrainingArguments would create it (accelerate's PartialState, the
    recipe's collective timeout): a sharded load needs it before the Trainer exists, and would make
    one itself with torch's default timeout. On the CPU, a fixed mmap threshold: FSDP2 allocates and
    frees each block's gathered weights at every use, glibc's dynamic threshold then rises to their
    size and serves them from the heap, which keeps what is freed (+0.85 GiB per rank measured on a
    225M model); a fixed one returns them. MALLOC_MMAP_THRESHOLD_ set by hand wins."""
    accelerate.PartialState(timeout=datetime.timedelta(seconds=job.recipe.training.collective_timeout_s))
    if not cuda and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)


# ---- trainer, train


def build_trainer(job: Job, model, tokenizer, dataset, eval_dataset):
    """The method's trainer, with progress recorded and SIGTERM handled; (trainer, recorder, stopper)."""
    record = progress.Recorder(job.world_size)
    marker = checkpoints.WholeCheckpoints(job.run, job.mode)
    trainer = make_trainer(job.run, model, tokenizer, dataset, eval_dataset, job.precision, [record, marker])
    record.counter = progress.count_tokens(trainer)
    stopper = preemption.StopOnSigterm(job.world_size)
    trainer.add_callback(stopper)
    stopper.install()
    if job.resume:
        checkpoints.resuming(trainer, job.resume.checkpoint, job.recipe.training.seed)
    return trainer, record, stopper


def train(job: Job, trainer, record, stopper, evaluating: bool):
    """Train; with evaluation rows the trainer evaluates first (eval_on_start: the baseline, or
    where a resumed run starts) and every eval_steps; here, last (unless the last step just did).
    Every rank calls evaluate: under ddp each evaluates its share."""
    if job.resume and trainer.accelerator.is_main_process:
        print(f"resuming {job.resume.describe()} (output.resume=false starts fresh)", flush=True)
    result = trainer.train(resume_from_checkpoint=str(job.resume.checkpoint) if job.resume else None)
    # What each rank holds while it trains: all of it under ddp, its shard under fsdp.
    record.held = gather_object([save.local_elements(trainer.model)])
    stopped = stopper.stopped_at is not None
    last = trainer.state.global_step
    if evaluating and not stopped and not (record.eval_losses and record.eval_losses[-1][0] == last):
        trainer.evaluate()
    return result


# ---- save, metrics


def save_and_measure(
    job: Job, trainer, tokenizer, record, loaded: dict[str, Any], data_record: prepare.Record
) -> dict[str, Any]:
    """Every rank: gather what the metrics need, save from the main process; -> the measurements.
    `loaded`: this rank's figures once its model was loaded, before training."""
    full = job.recipe.model.full_finetuning
    measured = {
        "data": gather_object([data_record.as_json(job.local_rank)]),
        "trainable_elements_per_rank": record.held,
        "peak_memory_gib": gather_object([progress.peak_memory_gib()]),
        "peak_host_memory_gib": gather_object([progress.peak_host_memory_gib()]),
        **{key: gather_object([value]) for key, value in loaded.items()},
        # Counted in the collator; GRPO's batches are raw prompts, so there TRL's own count serves.
        "tokens": sum(gather_object([record.counter.tokens])) or record.logged_tokens,
        "real_tokens": sum(gather_object([record.counter.real_tokens])),
        "saved": str(job.run.weights),
    }
    # Under fsdp every rank enters while the shards are gathered to rank 0 (for an adapter, only
    # the trainable weights); otherwise every rank already holds whole weights.
    with save.whole_parameters(trainer.model, trainable_only=not full) as whole:
        # Each rank that holds whole weights hashes them: ddp ranks must agree; fsdp has one copy.
        fingerprints = gather_object([save.trainable_fingerprint(trainer.model) if whole else None])
        measured["trainable_fingerprints"] = [f for f in fingerprints if f is not None]
        if trainer.accelerator.is_main_process:
            save.save_trained(trainer.model, tokenizer, job.run.weights)
    return measured


def export_trained(job: Job) -> list[dict]:
    """output.save's merged / GGUF exports, from the saved adapter, in this process alone, checked
    against the trained model unless output.check is off; the records of exports.json."""
    out = job.recipe.output
    targets = [(kind, out.gguf_quants if kind == "gguf" else ()) for kind in out.save if kind != "adapter"]
    if not targets:
        return []
    llama_cpp = exports.llama_cpp_folder(os.environ)
    return export.export_run(job.run, targets, llama_cpp, check=out.check, unchecked_by="output.check=false")


def write_metrics(job: Job, trainer, result, record, measured: dict[str, Any], cuda: bool) -> None:
    wall = time.time() - job.started
    runtime = float(result.metrics.get("train_runtime", 0.0))
    steady = record.summary(job.launched)
    metrics = {
        "recipe": job.recipe.name,
        "mode": job.mode,
        "world_size": job.world_size,
        "device": "cuda" if cuda else "cpu",
        "steps": trainer.state.global_step,
        "generation": generation_used(trainer),  # grpo: what generated the completions
        **{k: steady[k] for k in ("first_loss", "final_loss", "losses", "eval_loss", "eval_losses", "rewards")},
        "train_runtime_s": round(runtime, 3),
        "tokens": measured["tokens"],
        "tokens_per_second": round(measured["tokens"] / runtime, 1) if runtime else None,
        "real_tokens": measured["real_tokens"],
        **{
            k: steady[k]
            for k in (
                "steady_tokens_per_second",
                "steady_real_tokens_per_second",
                "step_time_s",
                "time_to_first_step_s",
                "steps_measured",
                "step_times_s",
                "step_tokens",
            )
        },
        "wall_time_s": round(wall, 3),
        # This process's data phase: checked, shaped, tokenized (or reused, or read where local rank 0
        # put them); each rank's in data_per_rank.
        "data_prepare_s": measured["data"][0]["seconds"],
        "data_per_rank": measured["data"],
        "peak_memory_gib": measured["peak_memory_gib"],
        "peak_host_memory_gib": measured["peak_host_memory_gib"],
        "peak_memory_at_load_gib": measured["peak_memory_at_load_gib"],
        "peak_host_memory_at_load_gib": measured["peak_host_memory_at_load_gib"],
        "time_to_model_loaded_s": max(measured["time_to_model_loaded_s"]),
        "trainable_elements_per_rank": measured["trainable_elements_per_rank"],
        "trainable_fingerprints": measured["trainable_fingerprints"],
        "resumed_from": str(job.resume.checkpoint) if job.resume else None,
        "global_batch_size": checkpoints.global_batch_size(trainer.args),
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "saved": measured["saved"],
        "exported": measured["exported"],
        "versions": {name: module.__version__ for name, module in VERSIONS.items()},
    }
    atomic.write_text(job.run.metrics, json.dumps(metrics, indent=2) + "\n")
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
        checkpoint = job.run.checkpoint_at(step)
        stopped = {
            "recipe": job.recipe.name,
            "interrupted": "SIGTERM",
            "steps": step,
            "checkpoint": str(checkpoint),
            "losses": record.losses,
            "wall_time_s": round(time.time() - job.started, 3),
        }
        atomic.write_text(job.run.metrics, json.dumps(stopped, indent=2) + "\n")
        print(f"preempted: saved {checkpoint}; run the same recipe again to resume from it", flush=True)
    return preemption.EXIT_PREEMPTED


def close(trainer) -> None:
    trainer.accelerator.wait_for_everyone()
    # Left to interpreter shutdown, gloo's threads can abort the process ("terminate called
    # without an active exception") after a successful run; close the group while all ranks live.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- the program


def data_and_model(job: Job, cuda: bool):
    """-> (model, tokenizer, training rows, evaluation rows, the data phase's record). Data before the
    model: a bad row must stop the run before minutes of model loading; the rows SFTTrainer would
    tokenize are tokenized once the model's tokenizer is loaded (Unsloth's, as training uses it)."""
    handoff = prepare.Handoff(job.world_size, job.local_rank)
    record = prepare.Record()
    shaped = record.stages["shaped"] = prepare.shaped(job.recipe, handoff)
    model_name = random_model.model_for(job.run, shaped.train)
    models.check_chat_template(job.recipe, model_name)
    spec = SPECS[job.mode]
    if spec.sharded_load:
        before_a_sharded_load(job, cuda)
    model, tokenizer = models.load(job.recipe, model_name, spec.device_map(cuda, job.local_rank), spec.sharded_load)
    rows = shaped
    if prepare.tokenizes(job.recipe):
        rows = record.stages["tokenized"] = prepare.tokenized(job.recipe, shaped, tokenizer, handoff)
    print(f"data: local rank {job.local_rank}: {record.summary()}", flush=True)
    return model, tokenizer, rows.train, rows.eval, record


def run(job: Job, cuda: bool) -> int:
    model, tokenizer, dataset, eval_dataset, data_record = data_and_model(job, cuda)
    trainer, record, stopper = build_trainer(job, model, tokenizer, dataset, eval_dataset)
    # The model loaded and placed (sharded under fsdp, in Trainer.__init__), before the first step.
    loaded = {
        "time_to_model_loaded_s": round(time.time() - job.launched, 3),
        "peak_memory_at_load_gib": progress.peak_memory_gib(),
        "peak_host_memory_at_load_gib": progress.peak_host_memory_gib(),
    }
    result = train(job, trainer, record, stopper, evaluating=eval_dataset is not None)
    if stopper.stopped_at is not None:
        status = preempted(job, trainer, record, stopper.stopped_at)
        close(trainer)
        return status
    measured = save_and_measure(job, trainer, tokenizer, record, loaded, data_record)
    main_process = trainer.accelerator.is_main_process
    close(trainer)  # the other ranks are done; exports need no collective
    if main_process:
        records = export_trained(job)
        measured["exported"] = list(dict.fromkeys(str(job.run.export_dir(r["kind"])) for r in records))
        write_metrics(job, trainer, result, record, measured, cuda)
        # Trained and saved; an export outside its tolerance still fails the run (exit 1, its line).
        return export.report_failures(records)
    return 0
