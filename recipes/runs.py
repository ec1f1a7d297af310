"""A run's output folder as the commands after training (`export`, `generate`) find it:

    <output>/launch/recipe.yaml          the recipe as resolved when it was launched
             (launch/node-0/recipe.yaml  on a job of several machines)
    <output>/adapter/ or model/          the trained adapter, or the whole model (full fine-tuning)
    <output>/checkpoints/checkpoint-N/   checkpoints, when training stopped before the end
    <output>/merged_16bit/, gguf/        exports

Shared by the launcher (which checks a request before starting anything) and trainer/export.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from recipes.errors import BadInput
from recipes.schema import Recipe

RECIPE_FILES = ("launch/recipe.yaml", "launch/node-0/recipe.yaml")
PREQUANTIZED = re.compile(r"(-unsloth)?-bnb-4bit$|-bnb-8bit$", re.IGNORECASE)


@dataclass(frozen=True)
class Run:
    folder: Path
    recipe: Recipe
    trained: Path | None  # adapter/ (LoRA) or model/ (full fine-tuning), once training finished
    checkpoint: Path | None  # the newest checkpoint, if any

    @property
    def trust_remote_code(self) -> bool:
        return self.recipe.model.trust_remote_code

    @property
    def vision(self) -> bool:
        """It trained an image-text model (data.format vision): loaded with its processor."""
        return self.recipe.data.format == "vision"

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
        found = next((folder / name for name in RECIPE_FILES if (folder / name).is_file()), None)
        if found is None:
            raise BadInput(
                f"{str(folder)!r} is not a run's output folder (no {RECIPE_FILES[0]} in it); give the folder a "
                f"run wrote (OUTPUTS_DIR/<recipe name>, or the recipe's output.dir) or the recipe it ran"
            )
        try:
            recipe = Recipe.model_validate(yaml.safe_load(found.read_text()))
        except (ValidationError, yaml.YAMLError) as exc:
            raise BadInput(
                f"{found} does not hold a valid recipe ({str(exc).splitlines()[0]}); run the recipe again"
            ) from None
        full = recipe.model.full_finetuning
        trained = folder / ("model" if full else "adapter")
        marker = "config.json" if full else "adapter_config.json"
        return cls(
            folder=folder,
            recipe=recipe,
            trained=trained if (trained / marker).is_file() else None,
            checkpoint=newest_checkpoint(folder / "checkpoints"),
        )


def newest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint-N folder with the highest N (training resumes from it; export falls back to it)."""
    steps = [
        (int(m.group(1)), p)
        for p in folder.glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()
    ]
    return max(steps)[1] if steps else None
