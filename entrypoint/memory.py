"""A first per-GPU memory estimate, from parameter count and how the weights are loaded.

Good enough to tell "fits one GPU" from "needs several"; it is deliberately simple and
errs on the large side. Parameter count: exact for random-init shapes, `model.size_b` when
the recipe gives it, else read from the model name ("Llama-3.1-8B" -> 8, "Mixtral-8x7B" -> 56).
Calibrated against Unsloth's measured peaks on one H100 (1.1B Llama, batch 4 x 2048):
2.85 GiB for bf16 LoRA, 1.55 GiB for 4-bit QLoRA (shared/notes/unsloth-2026.10.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from recipes.schema import Recipe

GIB = 1024**3

# Bytes per parameter of the frozen (or, for full fine-tuning, trained) weights.
WEIGHT_BYTES = {"4bit": 0.6, "8bit": 1.1, "16bit": 2.0}
# LoRA's trainable share of the model at rank 16 on all linear layers, and bytes per trainable
# parameter (16-bit weight + grad + fp32 AdamW moments + fp32 master copy).
LORA_SHARE_AT_R16 = 0.0075
TRAINABLE_BYTES = 16.0
FULL_FT_EXTRA_BYTES = {"adamw_8bit": 4.0, "paged_adamw_8bit": 4.0}  # grads + 8-bit moments
FULL_FT_EXTRA_DEFAULT = 10.0  # grads + fp32 moments
# Activations per token with Unsloth's offloaded gradient checkpointing, at 1.1B parameters;
# they grow with the hidden size, roughly the square root of the parameter count.
ACTIVATION_BYTES_PER_TOKEN_1B = 100_000
CUDA_OVERHEAD_GIB = 1.0  # context, cuBLAS workspace, allocator slack
USABLE_FRACTION = 0.92  # never plan to fill a GPU to the last byte

SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")


@dataclass(frozen=True)
class Estimate:
    params_b: float | None  # None: unknown (the name does not say and size_b is unset)
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    total_gib: float  # per GPU when the whole model sits on one GPU
    source: str  # where the parameter count came from

    def as_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def params_from_name(name: str) -> float | None:
    """Billions of parameters from a model name, or None."""
    for match in SIZE_IN_NAME.finditer(name.rsplit("/", 1)[-1]):
        experts, size, unit = match.groups()
        value = float(size) * (int(experts) if experts else 1)
        return value / 1000 if unit in "Mm" else value
    return None


def parameter_count_b(recipe: Recipe) -> tuple[float | None, str]:
    model = recipe.model
    if model.random_init is not None:
        return model.random_init.parameter_count() / 1e9, "random_init shape"
    if model.size_b is not None:
        return model.size_b, "model.size_b"
    from_name = params_from_name(model.name)
    if from_name is not None:
        return from_name, f"model name {model.name!r}"
    return None, "unknown (set model.size_b)"


def estimate(recipe: Recipe) -> Estimate:
    params_b, source = parameter_count_b(recipe)
    if params_b is None:
        return Estimate(None, 0.0, 0.0, 0.0, 0.0, source)
    params = params_b * 1e9
    model, training = recipe.model, recipe.training
    weights = params * WEIGHT_BYTES[model.load_in]
    if model.full_finetuning:
        trainable = params * FULL_FT_EXTRA_BYTES.get(training.optimizer, FULL_FT_EXTRA_DEFAULT)
    else:
        assert recipe.lora is not None
        trainable = params * LORA_SHARE_AT_R16 * (recipe.lora.r / 16) * TRAINABLE_BYTES
    tokens = training.per_device_batch_size * model.max_seq_length
    activations = tokens * ACTIVATION_BYTES_PER_TOKEN_1B * math.sqrt(max(params_b, 0.001) / 1.1)
    total = (weights + trainable + activations) / GIB + CUDA_OVERHEAD_GIB
    return Estimate(
        params_b=round(params_b, 4),
        weights_gib=round(weights / GIB, 2),
        trainable_gib=round(trainable / GIB, 2),
        activations_gib=round(activations / GIB, 2),
        total_gib=round(total, 2),
        source=source,
    )


def fits(total_gib: float, memory_gib: float | None) -> bool:
    """Unknown GPU memory or an unknown model size are trusted to fit."""
    return memory_gib is None or total_gib <= memory_gib * USABLE_FRACTION
