"""`python -m trainer`: the per-process training program. Its phases are trainer/program.py's;
this module runs the first, prepare, before any of the torch stack is imported:

  prepare   the recipe, this process's place in the launch (refusing the trap), the output folder
            and the checkpoint to resume from; a bad recipe exits 2 here, in well under a second
  stack     the mode's variables set, then Unsloth imported before anything imports transformers,
            TRL or PEFT (it patches them at import); only then the program's modules, which import
            the stack at their top
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

from recipes import catalog, exports, lifetime, modes, runs
from recipes.errors import EXIT_BAD_INPUT, BadInput
from recipes.modes import FSDP_SWITCH, SPECS, TRAP_EXPLAINED, Mode
from recipes.runs import Run, folder_of
from recipes.schema import Recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer", description="The per-process training program.")
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

    run: Run  # the output folder and the recipe
    mode: Mode
    precision: str
    world_size: int
    local_rank: int
    resume: runs.Resume | None  # the checkpoint to resume from, and the batch it trains with
    started: float = field(default_factory=time.time)  # this process
    # The launcher's start, which time-to-first-step counts from (this process's when started by hand).
    launched: float = field(default_factory=lambda: float(os.environ.get("ENTRYPOINT_STARTED_AT", time.time())))

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe


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


def prepare(argv: list[str] | None) -> Job:
    args = parse_args(argv)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Local rank 0 checks the rows (here their first ones, then every one in the data phase); the other
    # ranks of its machine read what it prepares (trainer/prepare.py).
    recipe = catalog.load(args.recipe, args.overrides, rows=local_rank == 0).recipe
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_mode(args.mode, world_size)
    modes.refuse_fsdp_switch(args.mode, os.environ.get(FSDP_SWITCH))
    exports.check_possible(recipe.output.gguf_quants, os.environ, recipe.output.check)
    run = Run(folder_of(recipe, os.environ.get("OUTPUTS_DIR"), os.getcwd()).resolve(), recipe)
    run.folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run.tensorboard))
    # A checkpoint written by another number of processes resumes with its global batch (the launcher's
    # plan already says so and wrote it into the recipe; started by hand, the same rule applies here).
    checkpoint = run.resume_point()
    facts = runs.whole(checkpoint) if checkpoint is not None else None
    resume = runs.resume_on(checkpoint, facts, args.mode, world_size, recipe) if checkpoint and facts else None
    if resume is not None:
        run = Run(run.folder, resume.applied(recipe))
    return Job(run, args.mode, args.mixed_precision, world_size, local_rank, resume)


def import_stack(job: Job) -> bool:
    """Import torch and Unsloth in the order they need; returns whether CUDA is there.

    The mode's variables (fsdp's UNSLOTH_FSDP2) are read at `import unsloth`. A rank of a
    multi-process launch selects its own GPU first: Unsloth's import touches the current device,
    which would otherwise be cuda:0 on every rank (a context there that rank 0's GPU pays for).
    """
    os.environ.update(SPECS[job.mode].child_env)
    import torch

    cuda = torch.cuda.is_available()
    if cuda and SPECS[job.mode].multi_process:
        torch.cuda.set_device(job.local_rank)
    import unsloth  # noqa: F401

    return cuda


def main(argv: list[str] | None = None) -> int:
    lifetime.follow_parent()
    try:
        job = prepare(argv)
        cuda = import_stack(job)
        from trainer import program  # after Unsloth: see the docstring

        status = program.run(job, cuda)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if job.world_size > 1:
        # Every output is written and closed and the process group destroyed. Under load, a rank's
        # interpreter teardown can still abort in a native thread's destructor ("terminate called
        # without an active exception", SIGABRT), failing a finished job; leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
