"""The load phase: the model's chat template, the model itself with the placement the mode needs,
and LoRA on top (a random-init shape is built offline first: trainer/random_model.py).

Unsloth's FastLanguageModel loads text models, its FastVisionModel image-text models (a data
format with images; there the "tokenizer" is the model's processor). A loader for another kind of
model is a new entry in LOADERS.
"""

from __future__ import annotations

import contextlib

import torch
import unsloth
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from unsloth.chat_templates import CHAT_TEMPLATES, get_chat_template
from unsloth_zoo.peft_utils import get_peft_regex

from recipes.errors import BadInput, closest
from recipes.formats import refuse_quantized_images_on_cpu
from recipes.schema import DEFAULT_TARGET_MODULES, VISION_PARTS, Recipe

LOADERS = {"text": "FastLanguageModel", "vision": "FastVisionModel"}  # unsloth's class for each kind of model


def check_chat_template(recipe: Recipe, model_name: str) -> None:
    """Conversations need a chat template: a known Unsloth name, or the tokenizer's own (for
    chats with images, the processor's own)."""
    if recipe.vision:
        processor = AutoProcessor.from_pretrained(model_name, trust_remote_code=recipe.model.trust_remote_code)
        if not getattr(processor, "chat_template", None):
            raise BadInput(
                f"the processor of {recipe.model.name} has no chat template, which data.format vision needs; "
                f"use the instruction-tuned model (its name usually ends in -Instruct or -it)"
            )
        return
    if not recipe.chats:
        return
    name = recipe.data.chat_template
    if name is not None:
        if name not in CHAT_TEMPLATES:
            raise BadInput(
                f"data.chat_template {name!r} is not an Unsloth chat template{closest(name, CHAT_TEMPLATES)}; "
                f"known: {', '.join(sorted(CHAT_TEMPLATES))}"
            )
        return
    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=recipe.model.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            f"the tokenizer of {recipe.model.name} has no chat template, which data.format "
            f"{' and '.join(f.name for f in recipe.formats if f.chat)} needs; set data.chat_template "
            f"(e.g. chatml, llama-3.1, qwen3)"
        )


def kind_of(recipe: Recipe) -> str:
    return "vision" if recipe.vision else "text"


def lora_targets(recipe: Recipe) -> list[str] | None:
    """The module names LoRA adapts. A vision model's towers name their layers their own way, so
    there the default is every linear layer of the parts lora.finetune_* choose (None)."""
    assert recipe.lora is not None
    targets = recipe.lora.target_modules
    return None if kind_of(recipe) == "vision" and targets == DEFAULT_TARGET_MODULES else targets


def vision_parts(recipe: Recipe) -> dict[str, bool]:
    assert recipe.lora is not None
    return {part: getattr(recipe.lora, part) for part in VISION_PARTS}


def load(recipe: Recipe, model_name: str, device_map, sharded: bool = False):
    """(model with LoRA when the recipe has it, tokenizer with the recipe's chat template; for a
    vision model, its processor).

    `sharded` (fsdp, with the process group up): a 16-bit model loads shard by shard through
    Unsloth's fsdp2_sharded_loading: each rank reads from the safetensors checkpoint only its FSDP2
    rows of every linear weight, and the embeddings and output head whole; the Trainer's shard_model
    then installs those rows as the rank's shards, so the whole model is never held by one rank.
    Unsloth refuses 4- and 8-bit weights there: they still load whole on every rank (the plan
    counts them so)."""
    kind = kind_of(recipe)
    if kind == "vision" and not torch.cuda.is_available():
        return load_vision_on_cpu(recipe, model_name)
    loader = getattr(unsloth, LOADERS[kind])
    m, t = recipe.model, recipe.training
    grpo = t.grpo
    # vLLM generates GRPO's completions when the launcher chose it (Unsloth's fast_inference).
    fast = {"fast_inference": True} if grpo is not None and grpo.generation == "vllm" else {}
    with sharded_loading(sharded and m.load_in == "16bit"):
        model, tokenizer = loader.from_pretrained(
            model_name=model_name,
            max_seq_length=m.max_seq_length,
            dtype=None if m.dtype == "auto" else getattr(torch, m.dtype),
            load_in_4bit=m.load_in == "4bit",
            load_in_8bit=m.load_in == "8bit",
            full_finetuning=m.full_finetuning,
            device_map=device_map,
            trust_remote_code=m.trust_remote_code,
            use_gradient_checkpointing=t.gradient_checkpointing,
            **fast,
        )
    if recipe.data.chat_template is not None:
        tokenizer = get_chat_template(tokenizer, chat_template=recipe.data.chat_template)
    if recipe.lora is not None:
        lora = recipe.lora
        model = loader.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_targets(recipe),
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing=t.gradient_checkpointing,
            random_state=t.seed,
            max_seq_length=m.max_seq_length,
            **(vision_parts(recipe) if kind == "vision" else {}),
        )
    return model, tokenizer


def sharded_loading(on: bool) -> contextlib.AbstractContextManager:
    if not on:
        return contextlib.nullcontext()
    # Here only: on the CPU backend, unsloth.models (its Triton kernels) adds 15 s to a process's start.
    from unsloth.models.fsdp2_load import fsdp2_sharded_loading

    return fsdp2_sharded_loading()


def load_vision_on_cpu(recipe: Recipe, model_name: str):
    """(model, processor) on the CPU, where Unsloth's backend has no vision models (its
    FastVisionModel raises there): transformers and PEFT, as that backend uses for text, with the
    LoRA targets Unsloth's own get_peft_regex chooses on a GPU."""
    m, t = recipe.model, recipe.training
    refuse_quantized_images_on_cpu(recipe.vision, m.load_in, gpu=False)  # the launcher refused it already
    dtype = torch.float32 if m.dtype == "auto" else getattr(torch, m.dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_name, dtype=dtype, trust_remote_code=m.trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_name, trust_remote_code=m.trust_remote_code)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.lora is None:
        return model, processor
    lora = recipe.lora
    targets = get_peft_regex(model, target_modules=lora_targets(recipe), **vision_parts(recipe))
    torch.manual_seed(t.seed)  # the same LoRA initialisation in every process
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), processor
