"""Resuming: the newest checkpoint of a run, and what resuming it needs on the CPU."""

from __future__ import annotations

from pathlib import Path

from recipes import runs
from recipes.errors import BadInput


def newest_checkpoint(folder: Path, max_steps: int) -> str | None:
    """The checkpoint to resume from (recipes/runs.py's rule, as export's); BadInput when it is
    already at or past max_steps."""
    found = runs.newest_checkpoint(folder)
    newest = str(found) if found is not None else None
    if newest and max_steps > 0 and int(newest.rsplit("-", 1)[-1]) >= max_steps:
        raise BadInput(
            f"{newest} is already at or past training.max_steps={max_steps}: nothing left to train. "
            f"Raise training.max_steps, set output.resume=false to start fresh, or use another output.dir"
        )
    return newest


def fix_cpu_ddp_resume(trainer) -> None:
    """transformers (5.17) loads the optimizer state of a multi-process run with
    map_location=args.device, which on the CPU is "cpu:0": torch.load cannot restore to that, so
    resuming CPU DDP fails. Map it to "cpu" while that one method runs; GPU runs are untouched."""
    import torch

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
