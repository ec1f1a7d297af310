"""The training methods a recipe can name (`training.method`): what data each trains on and its
own options, which live in their own section (`training.<method>`, e.g. `training.dpo.beta`).

A new method is one entry here, one in trainer/methods.py (the TRL classes that train it: that
side imports torch), and its recipes. Pure: pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recipes.errors import BadInput

# data.format names and what a row of each holds (recipes/formats.py checks rows)
DATA_FORMATS = ("messages", "instruction", "text", "preference", "prompt", "vision")


class Options(BaseModel):
    """A method's own options; unknown keys are errors, as everywhere in a recipe."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DpoOptions(Options):
    beta: Annotated[float, Field(gt=0)] = Field(
        default=0.1, description="how far the policy may move from the reference (TRL's DPOConfig.beta)"
    )


class GrpoOptions(Options):
    rewards: list[str] = Field(
        min_length=1,
        description="reward functions: bundled (recipes/rewards.py) or defined in reward_file; summed",
    )
    reward_file: str | None = Field(
        default=None,
        description="a Python file of your reward functions; it RUNS YOUR CODE, like trust_remote_code",
    )
    num_generations: Annotated[int, Field(ge=2)] = Field(default=4, description="completions per prompt")
    max_completion_length: Annotated[int, Field(gt=0)] = 256
    temperature: Annotated[float, Field(gt=0)] = 1.0
    beta: Annotated[float, Field(ge=0)] = Field(default=0.0, description="KL to the base model (0: none)")
    generation: Literal["auto", "vllm", "transformers"] = Field(
        default="auto", description="auto: vLLM (Unsloth's fast_inference) when installed, else transformers"
    )

    @model_validator(mode="after")
    def _unique_rewards(self) -> GrpoOptions:
        doubled = sorted({r for r in self.rewards if self.rewards.count(r) > 1})
        if doubled:
            raise ValueError(f"rewards {doubled} are named twice; each reward counts once, name it once")
        return self


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    formats: tuple[str, ...]  # the data formats it trains on, the first one its usual
    options: type[Options] | None = None  # its section, training.<name>
    refused_modes: tuple[str, ...] = ()  # modes it cannot train in, refused before launch
    why_refused: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sft",
            "supervised fine-tuning on chats, instructions or text, or on chats with images",
            ("messages", "instruction", "text", "vision"),
        ),
        Method("cpt", "continued pretraining on plain text", ("text",)),
        Method("dpo", "direct preference optimisation on chosen/rejected pairs", ("preference",), DpoOptions),
        Method(
            "grpo",
            "group relative policy optimisation: completions of prompts, scored by reward functions",
            ("prompt",),
            GrpoOptions,
            refused_modes=("fsdp",),
            why_refused="each process generates with the whole model, which fsdp shards over them",
        ),
    )
}

# Data formats that cannot train in a mode, and why: refused before launch, as a method's refused_modes.
FORMAT_REFUSED_MODES: dict[str, tuple[tuple[str, ...], str]] = {
    "vision": (("fsdp",), "Unsloth's FSDP2 shards text decoders, and a vision model's tower is not among them"),
}


def refuse_quantized_vision_on_cpu(fmt: str, load_in: str, gpu: bool) -> None:
    """On the CPU a vision model loads through transformers, in 16 bits (trainer/models.py)."""
    if fmt == "vision" and not gpu and load_in != "16bit":
        raise BadInput(
            f"model.load_in {load_in}: a vision model on the CPU loads in 16 bits; "
            f"set model.load_in=16bit, or train on a GPU"
        )


# Keys that moved; a recipe that still uses one is refused with its new place.
MOVED_KEYS = {"training.dpo_beta": "training.dpo.beta"}
