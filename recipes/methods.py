"""The training methods a recipe can name (`training.method`): what data each trains on and its
own options, which live in their own section (`training.<method>`, e.g. `training.dpo.beta`).

A new method is one entry here, its options section in recipes/schema.py's TrainingConfig, one entry
in trainer/methods.py (the TRL classes that train it: that side imports torch), and its recipes.
The data formats are recipes/formats.py's. Pure: pydantic only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    formats: tuple[str, ...]  # the data formats it trains on (recipes/formats.py), the first one its usual
    options: type[Options] | None = None  # its section, training.<name>
    refused_modes: tuple[str, ...] = ()  # modes it cannot train in, refused before launch
    why_refused: str = ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sft",
            "supervised fine-tuning on chats (messages, ShareGPT), instructions or text, or on chats with images",
            ("messages", "sharegpt", "instruction", "text", "vision"),
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

# Keys that moved; a recipe that still uses one is refused with its new place.
MOVED_KEYS = {"training.dpo_beta": "training.dpo.beta"}
