"""Checkpoints a killed run cannot spoil, and resuming from them.

transformers writes a checkpoint's files one after another (the adapter, the optimizer, each
rank's RNG state, the trainer state); a run killed in between leaves a folder that looks like a
checkpoint and is not one. So a checkpoint counts only once every rank has written its part and the
main process of each machine has written checkpoint.json in it, last (recipes/runs.py reads it).
transformers' own rotation is off: it could delete the newest whole checkpoint to keep a newer one
still being written; here older whole checkpoints go only once a newer one is whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from recipes import runs
from recipes.errors import BadInput
from recipes.runs import Run


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
                    "global_batch_size": args.per_device_train_batch_size
                    * args.gradient_accumulation_steps
                    * args.world_size,
                },
            )
            runs.keep_newest(self.run.checkpoints, self.run.recipe.output.keep_checkpoints)
        return control


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
