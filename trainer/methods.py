"""How each training method (recipes/methods.py names them and their data) is trained: the TRL
config and trainer classes, the arguments every method shares and what each adds. A new method is
one entry in TRAINERS, one in recipes/methods.py, and its recipes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import trl
from unsloth import trainer as unsloth_trainer

from recipes import methods, rewards
from recipes.runs import Run
from recipes.schema import Recipe


def shared_arguments(run: Run, precision: str) -> dict[str, Any]:
    """Arguments every method's TRL config takes."""
    recipe = run.recipe
    t, o, log = recipe.training, recipe.output, recipe.logging
    return dict(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=log.steps,
        report_to=[] if log.report_to == "none" else [log.report_to],
        save_strategy="steps" if o.save_steps else "no",
        save_steps=o.save_steps or 500,
        save_total_limit=None,  # trainer/checkpoints.py keeps output.keep_checkpoints, whole ones only
        dataloader_num_workers=0,
        ddp_timeout=t.collective_timeout_s,
        ddp_find_unused_parameters=False if every_weight_learns_every_step(recipe) else None,
        # Evaluation (when the recipe holds rows out): the loss only, first inside the training loop
        # (once the model is prepared: evaluating before train() prepares it apart from the optimizer,
        # which broke fsdp's optimizer checkpoints), every eval_steps, and at the end (the program).
        # Under ddp each rank evaluates its share.
        eval_on_start=recipe.data.evaluates,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        per_device_eval_batch_size=t.per_device_batch_size,
        prediction_loss_only=True,
    )


def trains_whole_modules(recipe: Recipe) -> bool:
    """LoRA that also trains embed_tokens / lm_head in full (Unsloth's modules_to_save).

    Unsloth sets DDP's find_unused_parameters=False only for a plain LoRA; with whole modules it
    leaves transformers' True, which under reentrant gradient checkpointing fails the first backward
    on GPUs ("marked as ready twice": the smoke recipe under ddp over two H200s). Every trainable weight
    of these text models gets a gradient at every step, so DDP has no unused ones to look for."""
    return recipe.lora is not None and bool({"embed_tokens", "lm_head"} & set(recipe.lora.target_modules))


def every_weight_learns_every_step(recipe: Recipe) -> bool:
    """No trainable weight sits out a step, so DDP need not look for unused ones (which, under
    Unsloth's reentrant gradient checkpointing, fails the first backward): LoRA that trains whole
    modules (below), and vision LoRA, since every row of data.format vision holds an image, so the
    tower's adapters see one every step."""
    return trains_whole_modules(recipe) or (recipe.lora is not None and recipe.vision)


def no_arguments(recipe: Recipe) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Trainer:
    """A method's TRL classes, what its config adds to the shared arguments, and what its trainer
    takes besides the model, data and tokenizer."""

    config: str  # a trl config class
    trainer: str  # the trl trainer class that takes it
    options: Callable[[Recipe], dict[str, Any]]
    trainer_arguments: Callable[[Recipe], dict[str, Any]] = no_arguments


def supervised_options(recipe: Recipe) -> dict[str, Any]:
    """sft and cpt: the shaped rows (recipes' data formats -> trainer/data.py). Chats with images
    reach the collator as they are (images still to be processed), as Unsloth's vision guide says."""
    if recipe.vision:
        return dict(
            max_length=recipe.model.max_seq_length,
            remove_unused_columns=False,
            dataset_text_field="",
            dataset_kwargs={"skip_prepare_dataset": True},
        )
    # The rows come tokenized, cut and packed (trainer/prepare.py, as TRL's own preparation would
    # make them): TRL prepares nothing, on no rank. packing still tells its collator the rows are packed.
    return dict(
        max_length=recipe.model.max_seq_length,
        packing=recipe.training.packing,
        dataset_text_field="text",
        completion_only_loss=recipe.data.train_on_responses_only or None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )


def vision_collator(model, processor):
    """Renders each chat, processes its images and masks what is not text to learn: Unsloth's
    collator on a GPU; on the CPU (where Unsloth has no vision models) TRL's, as SFTTrainer picks."""
    if not torch.cuda.is_available():
        return None
    return unsloth_trainer.UnslothVisionDataCollator(model, processor)


def preference_options(recipe: Recipe) -> dict[str, Any]:
    """dpo: its reference model is the adapter-free base (PEFT disables the adapter)."""
    assert recipe.training.dpo is not None  # the schema fills the method's own section
    return dict(max_length=recipe.model.max_seq_length, beta=recipe.training.dpo.beta)


def generation_options(recipe: Recipe) -> dict[str, Any]:
    """grpo: num_generations completions of each prompt, sampled by what the launcher chose
    (training.grpo.generation, resolved from auto in the launched recipe): vLLM; transformers' generate (Unsloth's
    fast generate on a GPU); or transformers' continuous batching, with the paged cache sized by the recipe."""
    grpo = recipe.training.grpo
    assert grpo is not None  # the schema requires the method's own section
    continuous = grpo.generation == "continuous_batching"
    return dict(
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        use_vllm=grpo.generation == "vllm",
        use_transformers_continuous_batching=continuous,
        transformers_continuous_batching_config=continuous_batching_config(recipe) if continuous else None,
    )


def continuous_batching_config(recipe: Recipe) -> dict[str, Any]:
    """transformers' ContinuousBatchingConfig with the cache the plan counted (recipes/methods.py). Its sizes are
    given, so max_memory_percent only bounds transformers' own check that they fit: all the free memory, not the half
    TRL asks for when transformers sizes the cache itself."""
    cache = methods.paged_cache(recipe)
    return dict(
        block_size=cache.block_size,
        num_blocks=cache.num_blocks,
        max_batch_tokens=cache.max_batch_tokens,
        max_memory_percent=1.0,
    )


def generation_used(trainer) -> str | None:
    """What GRPO's completions are generated with, as TRL's trainer decided it (None for other methods)."""
    if not hasattr(trainer, "use_transformers_continuous_batching"):
        return None
    if trainer.use_vllm:
        return "vllm"
    return "continuous_batching" if trainer.use_transformers_continuous_batching else "transformers"


def reward_functions(recipe: Recipe) -> dict[str, Any]:
    """grpo: the bundled rewards and those of the recipe's reward file (recipes/rewards.py)."""
    grpo = recipe.training.grpo
    assert grpo is not None
    return dict(reward_funcs=rewards.load(grpo.rewards, grpo.reward_file))


TRAINERS: dict[str, Trainer] = {
    "sft": Trainer("SFTConfig", "SFTTrainer", supervised_options),
    "cpt": Trainer("SFTConfig", "SFTTrainer", supervised_options),
    "dpo": Trainer("DPOConfig", "DPOTrainer", preference_options),
    "grpo": Trainer("GRPOConfig", "GRPOTrainer", generation_options, reward_functions),
}


def make_trainer(run: Run, model, tokenizer, dataset, eval_dataset, precision: str, callbacks: list):
    recipe = run.recipe
    method = TRAINERS[recipe.training.method]
    args = getattr(trl, method.config)(**shared_arguments(run, precision), **method.options(recipe))
    collator = vision_collator(model, tokenizer) if recipe.vision else None
    trainer = getattr(trl, method.trainer)(
        model=model,
        **method.trainer_arguments(recipe),
        **({"data_collator": collator} if collator is not None else {}),
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer
