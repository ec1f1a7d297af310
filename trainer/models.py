"""The load phase: which model (a hub id, a local folder, or a random-init shape built offline),
its chat template, the model itself with the placement the mode needs, and LoRA on top.

Unsloth's FastLanguageModel loads text models; a loader for another kind of model (vision,
for one) is a new entry in LOADERS.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from recipes.errors import BadInput, closest
from recipes.schema import Recipe

LOADERS = {"text": "FastLanguageModel"}  # unsloth's class for each kind of model
CHAT_FORMATS = ("messages", "instruction", "prompt")  # rendered with a chat template


def resolve_model(recipe: Recipe, texts: list[str], out: Path) -> str:
    """The folder or hub id to load; a random-init shape is built (once) under the output folder."""
    spec = recipe.model.random_init
    if spec is None:
        return recipe.model.name
    from trainer import random_model

    corpus_key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    folder = random_model.folder_for(spec, corpus_key, recipe.model.max_seq_length, out / "random-model")
    return str(random_model.build(spec, texts, folder, recipe.model.max_seq_length))


def check_chat_template(recipe: Recipe, model_name: str) -> None:
    """Conversations need a chat template: a known Unsloth name, or the tokenizer's own."""
    if recipe.data.format not in CHAT_FORMATS:
        return
    name = recipe.data.chat_template
    if name is not None:
        from unsloth.chat_templates import CHAT_TEMPLATES

        if name not in CHAT_TEMPLATES:
            raise BadInput(
                f"data.chat_template {name!r} is not an Unsloth chat template{closest(name, CHAT_TEMPLATES)}; "
                f"known: {', '.join(sorted(CHAT_TEMPLATES))}"
            )
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=recipe.model.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            f"the tokenizer of {recipe.model.name} has no chat template, which data.format "
            f"{recipe.data.format} needs; set data.chat_template (e.g. chatml, llama-3.1, qwen3)"
        )


def load(recipe: Recipe, model_name: str, device_map):
    """(model with LoRA when the recipe has it, tokenizer with the recipe's chat template)."""
    import torch
    import unsloth

    loader = getattr(unsloth, LOADERS["text"])
    m, t = recipe.model, recipe.training
    grpo = getattr(t, "grpo", None)
    # vLLM generates GRPO's completions when the launcher chose it (Unsloth's fast_inference).
    fast = {"fast_inference": True} if grpo is not None and grpo.generation == "vllm" else {}
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
        from unsloth.chat_templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=recipe.data.chat_template)
    if recipe.lora is not None:
        lora = recipe.lora
        model = loader.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing=t.gradient_checkpointing,
            random_state=t.seed,
            max_seq_length=m.max_seq_length,
        )
    return model, tokenizer
