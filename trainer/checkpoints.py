"""Checkpoints a killed run cannot spoil, and resuming from them.

transformers writes a checkpoint's files one after another (the adapter, the optimizer, each
rank's RNG state, the trainer state); a run killed in between leaves a folder that looks like a
checkpoint and is not one. So a checkpoint counts only once every rank has written its part and the
main process of each machine has written checkpoint.json in it, last (recipes/runs.py reads it).
transformers' own rotation is off: it could delete the newest whole checkpoint to keep a newer one
still being written; here older whole checkpoints go only once a newer one is whole.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals, set_rng_state_for_device

from recipes import runs
from recipes.errors import BadInput
from recipes.runs import Run

NEW_RANK_STRIDE = 1_000_003  # a prime: the seeds of new ranks never meet another's


class WholeCheckpoints(TrainerCallback):
    def __init__(self, run: Run, mode: str) -> None:
        self.run = run
        self.mode = mode

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files of this checkpoint are written
        if state.is_local_process_zero:
            runs.mark_whole(
                self.run.checkpoint_at(state.global_step),
                {
                    "mode": self.mode,
                    "world_size": args.world_size,
                    "per_device_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "global_batch_size": global_batch_size(args),
                },
            )
            runs.keep_newest(self.run.checkpoints, self.run.recipe.output.keep_checkpoints)
        return control


def global_batch_size(args) -> int:
    """The rows one optimizer step learns from, over every process (TrainingArguments)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def resuming(trainer, checkpoint, seed: int) -> None:
    """What resuming `checkpoint` needs, in this order: each rank's random state (also on another
    number of processes), CPU ddp's optimizer state, and last the clear failure around all three
    loads, so that it covers what the first two put in place."""
    every_rank_keeps_or_gets_its_rng(trainer, checkpoint, seed)
    resumable_on_cpu_ddp(trainer)
    resuming_fails_clearly(trainer, checkpoint)


def resuming_fails_clearly(trainer, checkpoint) -> None:
    """A checkpoint that cannot be read back (a disk error, a file changed by hand) ends the run with
    one line naming it and what to do, instead of a traceback from deep inside transformers."""
    for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state"):
        original = getattr(trainer, name)

        def load(*args, _original=original, **kwargs):
            try:
                return _original(*args, **kwargs)
            except Exception as exc:  # whatever reading it back raised: the checkpoint is the cause
                problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BadInput(
                    f"resuming from {checkpoint} failed ({type(exc).__name__}: {problem}); move that checkpoint "
                    f"out of checkpoints/ to resume from the one before it, or set output.resume=false to start fresh"
                ) from None

        setattr(trainer, name, load)


def every_rank_keeps_or_gets_its_rng(trainer, checkpoint, seed: int) -> None:
    """transformers restores a rank's random state only from a file named for the launch it resumes
    in (rng_state.pth alone, rng_state_<rank>.pth under several processes). Resumed on another number
    of processes, each rank that existed keeps its own state (rank 0 also from rng_state.pth), and a
    rank that did not gets a seed of the recipe's seed, its rank and the step, never another's."""
    step = runs.checkpoint_step(Path(checkpoint)) or 0

    def load(_checkpoint) -> None:
        rank = trainer.args.process_index
        names = [f"rng_state_{rank}.pth", *(["rng_state.pth"] if rank == 0 else [])]
        found = next((Path(checkpoint) / n for n in names if (Path(checkpoint) / n).is_file()), None)
        if found is None:
            transformers.set_seed(seed + NEW_RANK_STRIDE * rank + step)
            return
        with safe_globals():  # numpy's state, as transformers allows it
            state = torch.load(found, weights_only=True)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and "cuda" in state:
            distributed = trainer.args.parallel_mode == transformers.training_args.ParallelMode.DISTRIBUTED
            set_rng_state_for_device("CUDA", torch.cuda, state, distributed)

    trainer._load_rng_state = load


def resumable_on_cpu_ddp(trainer) -> None:
    """transformers (5.17) loads the optimizer state of a multi-process run with
    map_location=args.device, which on the CPU is "cpu:0": torch.load cannot restore to that, so
    resuming CPU DDP fails. Map it to "cpu" while that one method runs; GPU runs are untouched."""
    if torch.cuda.is_available() or trainer.args.world_size <= 1:
        return
    original = trainer._load_optimizer_and_scheduler

    def load(checkpoint):
        real_load = torch.load

        def cpu_load(*args, **kwargs):
            if "map_location" in kwargs:
                kwargs["map_location"] = "cpu"
            return real_load(*args, **kwargs)

        torch.load = cpu_load
        try:
            return original(checkpoint)
        finally:
            torch.load = real_load

    trainer._load_optimizer_and_scheduler = load
