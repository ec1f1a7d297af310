"""The training methods a recipe can name (`training.method`): what data each trains on and its
own options, which live in their own section (`training.<method>`, e.g. `training.dpo.beta`).

A new method is one entry here, one in trainer/methods.py (the TRL classes that train it: that
side imports torch), and its recipes. Pure: pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# data.format names and what a row of each holds (recipes/formats.py checks rows)
DATA_FORMATS = ("messages", "instruction", "text", "preference")


class Options(BaseModel):
    """A method's own options; unknown keys are errors, as everywhere in a recipe."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DpoOptions(Options):
    beta: Annotated[float, Field(gt=0)] = Field(
        default=0.1, description="how far the policy may move from the reference (TRL's DPOConfig.beta)"
    )


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    formats: tuple[str, ...]  # the data formats it trains on, the first one its usual
    options: type[Options] | None = None  # its section, training.<name>


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sft", "supervised fine-tuning on chats, instructions or text", ("messages", "instruction", "text")),
        Method("cpt", "continued pretraining on plain text", ("text",)),
        Method("dpo", "direct preference optimisation on chosen/rejected pairs", ("preference",), DpoOptions),
    )
}

# Keys that moved; a recipe that still uses one is refused with its new place.
MOVED_KEYS = {"training.dpo_beta": "training.dpo.beta"}
