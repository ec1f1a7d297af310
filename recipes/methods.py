"""The training methods a recipe can name (`training.method`): what data each trains on and its
own options, which live in their own section (`training.<method>`, e.g. `training.dpo.beta`).

A new method is one entry here, its options section in recipes/schema.py's TrainingConfig, one entry
in trainer/methods.py (the TRL classes that train it: that side imports torch), and its recipes.
The data formats are recipes/formats.py's. Pure: pydantic only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # recipes/schema.py imports this module
    from recipes.schema import Recipe


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
    generation: Literal["auto", "vllm", "transformers", "continuous_batching"] = Field(
        default="auto",
        description="auto: vLLM (Unsloth's fast_inference) when installed, else transformers (generate: Unsloth's "
        "fast generate on a GPU); continuous_batching: transformers' continuous batching, with a paged KV cache",
    )

    @model_validator(mode="after")
    def _unique_rewards(self) -> GrpoOptions:
        doubled = sorted({r for r in self.rewards if self.rewards.count(r) > 1})
        if doubled:
            raise ValueError(f"rewards {doubled} are named twice; each reward counts once, name it once")
        return self


# transformers' continuous batching keeps the KV cache in blocks of this many tokens (its own default), and runs
# at most PAGED_BATCH_TOKENS tokens through the model at once: a step's prompts prefill in a pass or two, and a
# decode pass holds one token per sequence. Each pass holds the logits of that many tokens (fp32, vocabulary wide).
PAGED_BLOCK_TOKENS = 256
PAGED_BATCH_TOKENS = 1024


@dataclass(frozen=True)
class PagedCache:
    """The paged KV cache of continuous batching (training.grpo.generation: continuous_batching), sized here rather
    than by transformers, which would take a share of the memory free at each generation (TRL asks for half of
    it; on the CPU, half of the free RAM, allocated before every step's generation: a tiny model's steps took
    25-43 s instead of 5)."""

    block_size: int
    num_blocks: int
    max_batch_tokens: int

    @property
    def tokens(self) -> int:
        return self.block_size * self.num_blocks


def paged_cache(recipe: Recipe) -> PagedCache:
    """Room for every sequence one generation call holds, at model.max_seq_length tokens each (prompt and
    completion): TRL generates a whole step's completions in one call on each process, per_device_batch_size x
    gradient_accumulation_steps of them (its steps_per_generation defaults to the accumulation steps)."""
    sequences = generated_sequences(recipe)
    length = recipe.model.max_seq_length
    return PagedCache(
        block_size=PAGED_BLOCK_TOKENS,
        num_blocks=sequences * math.ceil(length / PAGED_BLOCK_TOKENS),
        max_batch_tokens=min(PAGED_BATCH_TOKENS, sequences * length),
    )


def generated_sequences(recipe: Recipe) -> int:
    """The completions one GRPO generation call makes on each process."""
    return recipe.training.per_device_batch_size * recipe.training.gradient_accumulation_steps


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
