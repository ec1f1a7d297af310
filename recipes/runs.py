"""A run's output folder: every path in it is named here, and read from here by the launcher, the
training program and the commands after training (`export`, `generate`).

    <output>/launch/recipe.yaml          the recipe as resolved when it was launched, the plan, the
             launch/node-N/              accelerate config (node-N/: each machine of a job of several)
    <output>/checkpoints/checkpoint-N/   checkpoints (output.save_steps); whole once checkpoint.json
                                         is in it, which the training program writes last
    <output>/checkpoints-incomplete/     checkpoints a killed run left half written, set aside
    <output>/adapter/ or model/          the trained adapter, or the whole model (full fine-tuning)
    <output>/merged_16bit/, gguf/        exports, listed in exports.json
    <output>/metrics.json, tensorboard/  what the run measured
    <output>/random-model/               a random-init recipe's model, built offline
    <output>/.lock                       held by the job writing the folder (entrypoint/runlock.py)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recipes import atomic
from recipes.errors import BadInput
from recipes.modes import SPECS
from recipes.schema import Recipe

DEFAULT_OUTPUTS_DIR = "outputs"  # OUTPUTS_DIR's default: runs go to ./outputs/<recipe name>
PREQUANTIZED = re.compile(r"(-unsloth)?-bnb-4bit$|-bnb-8bit$", re.IGNORECASE)
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
CHECKPOINTS = "checkpoints"
INCOMPLETE = "checkpoints-incomplete"
WHOLE = "checkpoint.json"  # written last into a checkpoint, once every rank has written its part


def launch_dir(folder: Path, node_rank: int = 0, nnodes: int = 1) -> Path:
    """Where a launcher writes its launch files: machines of one job may share the output folder."""
    return folder / "launch" / (f"node-{node_rank}" if nnodes > 1 else "")


def lock_file(folder: Path, node_rank: int = 0) -> Path:
    """The lock a job's launcher holds on the folder; each machine of a job of several holds its own."""
    return folder / (".lock" if node_rank == 0 else f".lock-node-{node_rank}")


def folder_of(recipe: Recipe, outputs_dir: str | None, cwd: str | Path) -> Path:
    """Where a run of the recipe writes: output.dir, else OUTPUTS_DIR/<recipe name>; relative to cwd."""
    configured = recipe.output.dir
    path = Path(configured) if configured else Path(outputs_dir or DEFAULT_OUTPUTS_DIR) / str(recipe.name)
    return path if path.is_absolute() else Path(cwd) / path


@dataclass(frozen=True)
class Run:
    folder: Path
    recipe: Recipe

    # ---- where things go

    @property
    def checkpoints(self) -> Path:
        return self.folder / CHECKPOINTS

    @property
    def incomplete(self) -> Path:
        return self.folder / INCOMPLETE

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    @property
    def weights(self) -> Path:
        """What training saves: adapter/ (LoRA), or model/ (full fine-tuning: the whole model)."""
        return self.folder / ("model" if self.recipe.model.full_finetuning else "adapter")

    @property
    def merged(self) -> Path:
        return self.folder / "merged_16bit"

    @property
    def gguf(self) -> Path:
        return self.folder / "gguf"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"

    @property
    def exports(self) -> Path:
        return self.folder / "exports.json"

    @property
    def tensorboard(self) -> Path:
        return self.folder / "tensorboard"

    @property
    def random_models(self) -> Path:
        return self.folder / "random-model"

    def export_dir(self, kind: str) -> Path:
        """Where an export kind (recipes/exports.py's KINDS) is written."""
        return {"adapter": self.adapter, "merged_16bit": self.merged, "gguf": self.gguf}[kind]

    def checkpoint_at(self, step: int) -> Path:
        return self.checkpoints / f"checkpoint-{step}"

    # ---- what is there

    @property
    def trained(self) -> Path | None:
        """adapter/ or model/, once training finished and saved it."""
        marker = "config.json" if self.recipe.model.full_finetuning else "adapter_config.json"
        return self.weights if (self.weights / marker).is_file() else None

    @property
    def checkpoint(self) -> Path | None:
        """The newest checkpoint, if any (training resumes from it; export falls back to it)."""
        return newest_checkpoint(self.checkpoints)

    def resume_point(self) -> Path | None:
        """The checkpoint a new run of the recipe starts from (none with output.resume off); BadInput
        when it is already at or past max_steps, rather than silently training nothing."""
        newest = self.checkpoint if self.recipe.output.resume else None
        if newest is not None:
            refuse_finished(newest, self.recipe.training.max_steps)
        return newest

    @property
    def whole_model(self) -> Path | None:
        """A 16-bit model that needs no adapter: merged_16bit/, or model/ after full fine-tuning."""
        folder = self.weights if self.recipe.model.full_finetuning else self.merged
        return folder if (folder / "config.json").is_file() else None

    @property
    def trust_remote_code(self) -> bool:
        return self.recipe.model.trust_remote_code

    @property
    def vision(self) -> bool:
        return self.recipe.vision

    def base_model(self) -> str:
        """What the adapter was trained on: the path PEFT recorded (a random-init model's folder),
        else the recipe's model."""
        for folder in (self.trained, self.checkpoint):
            config = folder / "adapter_config.json" if folder else None
            if config is not None and config.is_file():
                return json.loads(config.read_text()).get("base_model_name_or_path") or self.recipe.model.name
        return self.recipe.model.name

    def merge_base(self) -> str:
        """The 16-bit model to merge the adapter into. Unsloth loads a hub model asked for in 4 bits
        from its pre-quantized copy (unsloth/X -> unsloth/X-unsloth-bnb-4bit), which PEFT records;
        its 16-bit weights are those of the recipe's model."""
        recorded = self.base_model()
        asked = self.recipe.model.name
        if PREQUANTIZED.search(recorded) and not PREQUANTIZED.search(asked) and self.recipe.model.random_init is None:
            return asked
        return recorded

    @classmethod
    def read(cls, folder: Path) -> Run:
        """BadInput, naming the folder and the fix, when it is not a run's output folder."""
        candidates = [launch_dir(folder) / "recipe.yaml", launch_dir(folder, 0, 2) / "recipe.yaml"]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise BadInput(
                f"{str(folder)!r} is not a run's output folder (no {candidates[0].relative_to(folder)} in it); give "
                f"the folder a run wrote (OUTPUTS_DIR/<recipe name>, or the recipe's output.dir) or the recipe it ran"
            )
        try:
            recipe = Recipe.model_validate(yaml.safe_load(found.read_text()))
        except (ValidationError, yaml.YAMLError) as exc:
            raise BadInput(
                f"{found} does not hold a valid recipe ({str(exc).splitlines()[0]}); run the recipe again"
            ) from None
        return cls(folder, recipe)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints_in(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N folder, whole or not, oldest first."""
    found = [(step, p) for p in folder.glob("checkpoint-*") if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return sorted(found)


def whole(checkpoint: Path) -> dict[str, Any] | None:
    """What a whole checkpoint records of the run that wrote it (its step, world size, batch...);
    None when it is not whole: a run ended while writing it."""
    try:
        facts = json.loads((checkpoint / WHOLE).read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and facts.get("step") == checkpoint_step(checkpoint) else None


def newest_checkpoint(folder: Path) -> Path | None:
    """The whole checkpoint-N folder with the highest N: training resumes from it, export falls back to it."""
    return next((p for _, p in reversed(checkpoints_in(folder)) if whole(p) is not None), None)


def mark_whole(checkpoint: Path, facts: dict[str, Any]) -> None:
    atomic.write_text(checkpoint / WHOLE, json.dumps({"step": checkpoint_step(checkpoint), **facts}, indent=2) + "\n")


def keep_newest(folder: Path, keep: int) -> list[Path]:
    """Remove whole checkpoints older than the `keep` newest whole ones; never one that is not whole
    (the one being written), so the newest whole checkpoint always stays."""
    complete = [p for _, p in checkpoints_in(folder) if whole(p) is not None]
    removed = complete[: max(len(complete) - keep, 0)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def refuse_finished(checkpoint: Path, max_steps: int) -> None:
    if max_steps > 0 and (checkpoint_step(checkpoint) or 0) >= max_steps:
        raise BadInput(
            f"{checkpoint} is already at or past training.max_steps={max_steps}: nothing left to train. "
            f"Raise training.max_steps, set output.resume=false to start fresh, or use another output.dir"
        )


@dataclass(frozen=True)
class Resume:
    """What resuming a checkpoint on this launch does: the batch it keeps, or the nearest it can."""

    checkpoint: Path
    step: int
    was: dict[str, int]  # world_size, per_device_batch_size, gradient_accumulation_steps, global_batch_size
    now: dict[str, int]

    @property
    def exact(self) -> bool:
        return self.was["global_batch_size"] == self.now["global_batch_size"]

    def describe(self) -> str:
        was, now = self.was, self.now
        shape = (
            f"{was['world_size']} process(es) x {was['per_device_batch_size']} rows x "
            f"{was['gradient_accumulation_steps']} accumulated -> {now['world_size']} x "
            f"{now['per_device_batch_size']} x {now['gradient_accumulation_steps']}"
        )
        kept = (
            f"the global batch of {was['global_batch_size']} rows kept"
            if self.exact
            else f"the global batch was {was['global_batch_size']} rows and cannot be kept with "
            f"{now['world_size']} processes: the nearest is {now['global_batch_size']}"
        )
        return f"from {self.checkpoint.name} (step {self.step}): {shape}, {kept}"

    def applied(self, recipe: Recipe) -> Recipe:
        """The recipe with the rows per process and the gradient accumulation this resume trains with."""
        training = recipe.training.model_copy(
            update={
                "per_device_batch_size": self.now["per_device_batch_size"],
                "gradient_accumulation_steps": self.now["gradient_accumulation_steps"],
            }
        )
        return recipe.model_copy(update={"training": training})

    def as_json(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "was": self.was, "now": self.now,
                "exact": self.exact, "summary": self.describe()}  # fmt: skip


def resume_on(checkpoint: Path, facts: dict[str, Any], mode: str, world_size: int, recipe: Recipe) -> Resume:
    """How a run of `world_size` processes resumes a whole checkpoint written by another shape of
    launch: the same global batch where it can be (gradient accumulation recomputed, and the rows
    per process lowered where that alone makes it exact), else the nearest; BadInput where the
    checkpoint cannot be read back in this mode (a sharded run's optimizer state is keyed by
    parameter name, an unsharded run's by position)."""
    refuse_finished(checkpoint, recipe.training.max_steps)
    was_sharded = SPECS[facts.get("mode", "single")].memory == "sharded"
    if was_sharded != (SPECS[mode].memory == "sharded"):
        raise BadInput(
            f"{checkpoint} was written under PARALLELISM={facts.get('mode')}, and this run is {mode}: its optimizer "
            f"state is saved {'sharded' if was_sharded else 'whole'}, which {mode} cannot read back; resume it "
            f"under PARALLELISM={'fsdp' if was_sharded else 'ddp'} (any number of processes), or start fresh "
            f"with output.resume=false"
        )
    keys = ("world_size", "per_device_batch_size", "gradient_accumulation_steps", "global_batch_size")
    was = {key: int(facts.get(key, 0)) for key in keys}
    per_device = recipe.training.per_device_batch_size
    goal = was["global_batch_size"] or per_device * recipe.training.gradient_accumulation_steps * world_size
    now_batch, now_accumulation = per_device, max(1, round(goal / (per_device * world_size)))
    for rows in range(per_device, 0, -1):  # fewer rows per process only where that keeps it exact
        if goal % (rows * world_size) == 0:
            now_batch, now_accumulation = rows, goal // (rows * world_size)
            break
    now = {
        "world_size": world_size,
        "per_device_batch_size": now_batch,
        "gradient_accumulation_steps": now_accumulation,
        "global_batch_size": now_batch * now_accumulation * world_size,
    }
    return Resume(checkpoint, checkpoint_step(checkpoint) or 0, was, now)


def set_aside_incomplete(run_folder: Path) -> list[tuple[Path, Path]]:
    """Move every checkpoint that is not whole out of checkpoints/ into checkpoints-incomplete/
    (never deleted: what is in one may still help someone): -> (from, to) of each. Only a job that
    holds the folder's lock may call it, or it could move the checkpoint another job is writing."""
    moved = []
    for _, path in checkpoints_in(run_folder / CHECKPOINTS):
        if whole(path) is None:
            target = run_folder / INCOMPLETE / path.name
            serial = 1
            while target.exists():
                serial += 1
                target = run_folder / INCOMPLETE / f"{path.name}.{serial}"
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved.append((path, target))
    return moved
