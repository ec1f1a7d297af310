"""The per-process training program. Started by the launcher, once per process:

    python -m recipes.train --recipe RESOLVED.yaml --mode single|model --mixed-precision bf16
    accelerate launch --config_file ... -m recipes.train --recipe RESOLVED.yaml --mode ddp|fsdp ...

It reads top to bottom: refuse the trap, place the model as the mode needs (recipes/placement.py),
build the data and the trainer (under fsdp, Unsloth shards the model inside it), train
(resuming from the newest checkpoint), save on the main process only (under fsdp every rank
gathers the shards to it first), and write metrics. A bad recipe or data row exits with
status 2 before any model loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from recipes import atomic, catalog, data, exports, placement, preemption, progress
from recipes.errors import EXIT_BAD_INPUT, BadInput, closest
from recipes.schema import Recipe

STARTED = time.time()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipes.train", description=__doc__)
    parser.add_argument(
        "--recipe", required=True, help="recipe name or YAML file (the launcher passes the resolved one)"
    )
    parser.add_argument("--mode", choices=placement.MODES, default="single")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def check_mode(mode: str, world_size: int) -> None:
    """Balanced placement under a multi-process launch fails deep inside accelerate, and FSDP2
    with one process has nothing to shard over (Unsloth would quietly train unsharded): stop first."""
    if mode == "fsdp" and world_size < 2:
        raise BadInput(
            f"--mode fsdp shards the model over the processes of a multi-process launch, but WORLD_SIZE="
            f"{world_size}; start it with accelerate launch over 2 or more processes (PARALLELISM=fsdp does), "
            f"or use --mode single"
        )
    if mode == "model" and world_size > 1:
        raise BadInput(
            f"--mode model (device_map='balanced', one model split over the GPUs of ONE process) "
            f"was started as one of {world_size} processes (WORLD_SIZE={world_size}); every rank "
            f"would load its own split copy and training would fail with \"You can't train a model "
            f"that has been loaded with device_map='auto' in any distributed mode\". Start it as one "
            f"plain process (PARALLELISM=model), or use PARALLELISM=ddp"
        )


def resolve_model(recipe: Recipe, texts: list[str], out: Path) -> str:
    """The folder or hub id to load; a random-init shape is built (once) under the output folder."""
    spec = recipe.model.random_init
    if spec is None:
        return recipe.model.name
    from recipes import random_model

    corpus_key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    folder = random_model.folder_for(spec, corpus_key, recipe.model.max_seq_length, out / "random-model")
    return str(random_model.build(spec, texts, folder, recipe.model.max_seq_length))


def check_chat_template(recipe: Recipe, model_name: str) -> None:
    """Conversations need a chat template: a known Unsloth name, or the tokenizer's own."""
    if recipe.data.format not in ("messages", "instruction"):
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


def trainable_fingerprint(model) -> str:
    """A hash of every trainable weight: equal on every DDP rank when they stayed in step."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainer_config(recipe: Recipe, out: Path, precision: str) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig."""
    t, o, log = recipe.training, recipe.output, recipe.logging
    return dict(
        output_dir=str(out / "checkpoints"),
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
        save_total_limit=o.keep_checkpoints,
        dataloader_num_workers=0,
        max_length=recipe.model.max_seq_length,
        ddp_timeout=t.collective_timeout_s,
        ddp_find_unused_parameters=False if trains_whole_modules(recipe) else None,
    )


def trains_whole_modules(recipe: Recipe) -> bool:
    """LoRA that also trains embed_tokens / lm_head in full (Unsloth's modules_to_save).

    Unsloth sets DDP's find_unused_parameters=False only for a plain LoRA; with whole modules it
    leaves transformers' True, which under reentrant gradient checkpointing fails the first backward
    on GPUs ("marked as ready twice": the smoke recipe under ddp over two H200s). Every trainable weight
    of these text models gets a gradient at every step, so DDP has no unused ones to look for."""
    return recipe.lora is not None and bool({"embed_tokens", "lm_head"} & set(recipe.lora.target_modules))


def make_trainer(recipe: Recipe, model, tokenizer, dataset, out: Path, precision: str, callbacks: list):
    common = trainer_config(recipe, out, precision)
    if recipe.training.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=recipe.training.dpo_beta)
        return DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **common,
        packing=recipe.training.packing,
        dataset_text_field="text",
        completion_only_loss=recipe.data.train_on_responses_only or None,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)


def save_trained(model, tokenizer, folder: Path) -> None:
    """The adapter that trained (or the whole model, for full fine-tuning), and the tokenizer.

    TRL's DPOTrainer adds a frozen copy of the starting adapter, "ref", as its reference model;
    it is the untrained starting point, not a result (and under fsdp its shards are not gathered).
    """
    options = {"selected_adapters": [model.active_adapter]} if hasattr(model, "peft_config") else {}
    model.save_pretrained(str(folder), **options)
    tokenizer.save_pretrained(str(folder))


def fix_cpu_ddp_resume(trainer) -> None:
    """transformers (5.17) loads the optimizer state of a multi-process run with
    map_location=args.device, which on the CPU is "cpu:0": torch.load cannot restore to that, so
    resuming CPU DDP fails. Map it to "cpu" while that one method runs; GPU runs are untouched."""
    import torch

    if torch.cuda.is_available() or trainer.args.world_size <= 1:
        return
    original = trainer._load_optimizer_and_scheduler

    def load(checkpoint):
        real_load = torch.load

        def cpu_load(*args, **kwargs):
            if "map_location" in kwargs:
                kwargs["map_location"] = "cpu"
            return real_load(*args, **kwargs)

        torch.load = cpu_load
        try:
            return original(checkpoint)
        finally:
            torch.load = real_load

    trainer._load_optimizer_and_scheduler = load


def newest_checkpoint(folder: Path, max_steps: int) -> str | None:
    """The checkpoint to resume from; BadInput when it is already at or past max_steps."""
    from transformers.trainer_utils import get_last_checkpoint

    newest = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if newest and max_steps > 0 and int(newest.rsplit("-", 1)[-1]) >= max_steps:
        raise BadInput(
            f"{newest} is already at or past training.max_steps={max_steps}: nothing left to train. "
            f"Raise training.max_steps, set output.resume=false to start fresh, or use another output.dir"
        )
    return newest


def run(args: argparse.Namespace) -> int:
    recipe = catalog.load(args.recipe, args.overrides).recipe
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_mode(args.mode, world_size)
    placement.check_fsdp_switch(args.mode, os.environ)
    placement.check_exports(args.mode, recipe.output.save)
    exports.check_possible(recipe, os.environ)
    out = Path(recipe.output.dir or Path("outputs") / str(recipe.name)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    resume = newest_checkpoint(out / "checkpoints", recipe.training.max_steps) if recipe.output.resume else None

    if args.mode == "fsdp":
        os.environ.update(placement.FSDP_ENV)  # read by `import unsloth`, just below
    # Unsloth patches transformers, TRL and PEFT at import: it comes before them.
    import torch

    cuda = torch.cuda.is_available()
    if cuda and args.mode in placement.MULTI_PROCESS:
        # Before `import unsloth`, which allocates on the current device: left at cuda:0, rank 1
        # allocated ~31 MB on rank 0's GPU (seen on 2 x H200).
        torch.cuda.set_device(local_rank)
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    # Data before the model: a bad row must stop the run before minutes of model loading.
    dataset = data.build(recipe.data)
    model_name = resolve_model(recipe, data.texts_of(dataset), out)
    check_chat_template(recipe, model_name)
    m = recipe.model
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_name,
        max_seq_length=m.max_seq_length,
        dtype=None if m.dtype == "auto" else getattr(torch, m.dtype),
        load_in_4bit=m.load_in == "4bit",
        load_in_8bit=m.load_in == "8bit",
        full_finetuning=m.full_finetuning,
        device_map=placement.device_map(args.mode, cuda, local_rank),
        trust_remote_code=m.trust_remote_code,
        use_gradient_checkpointing=recipe.training.gradient_checkpointing,
    )
    if recipe.data.chat_template is not None:
        from unsloth.chat_templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=recipe.data.chat_template)
    if recipe.lora is not None:
        lora = recipe.lora
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_rslora=lora.use_rslora,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            random_state=recipe.training.seed,
            max_seq_length=m.max_seq_length,
        )

    record = progress.make_recorder(world_size)
    trainer = make_trainer(recipe, model, tokenizer, dataset, out, args.mixed_precision, [record])
    record.counter = progress.count_tokens(trainer)
    stopper = preemption.make_callback(world_size)
    trainer.add_callback(stopper)
    stopper.install()
    fix_cpu_ddp_resume(trainer)
    if resume and trainer.accelerator.is_main_process:
        print(f"resuming from {resume} (output.resume=false starts fresh)", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)

    if stopper.stopped_at is not None:
        return preempted(trainer, record, recipe, out, stopper.stopped_at)

    from accelerate.utils import gather_object

    held = gather_object([placement.local_elements(trainer.model)])  # ddp: all of them; fsdp: a shard
    peaks = gather_object([progress.peak_memory_gib()])
    tokens = sum(gather_object([record.counter.tokens]))
    final = "model" if m.full_finetuning else "adapter"
    # Under fsdp every rank enters while the shards are gathered to rank 0 (for an adapter, only
    # the trainable weights); otherwise every rank already holds whole weights.
    with placement.whole_parameters(trainer.model, trainable_only=not m.full_finetuning) as whole:
        # Each rank that holds whole weights hashes them: ddp ranks must agree; fsdp has one copy.
        fingerprints = gather_object([trainable_fingerprint(trainer.model) if whole else None])
        fingerprints = [f for f in fingerprints if f is not None]
        if trainer.accelerator.is_main_process:
            with atomic.folder(out / final) as tmp:  # a crash never leaves half an adapter
                save_trained(trainer.model, tokenizer, tmp)
            exported = exports.write(trainer.model, tokenizer, out, recipe)
    if trainer.accelerator.is_main_process:
        wall = time.time() - STARTED
        runtime = float(result.metrics.get("train_runtime", 0.0))
        launcher_t0 = float(os.environ.get("ENTRYPOINT_STARTED_AT", STARTED))
        measured = record.summary(launcher_t0)
        metrics = {
            "recipe": recipe.name,
            "mode": args.mode,
            "world_size": world_size,
            "device": "cuda" if cuda else "cpu",
            "steps": trainer.state.global_step,
            **{k: measured[k] for k in ("first_loss", "final_loss", "losses")},
            "train_runtime_s": round(runtime, 3),
            "tokens": tokens,
            "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
            **{
                k: measured[k]
                for k in (
                    "steady_tokens_per_second",
                    "step_time_s",
                    "time_to_first_step_s",
                    "steps_measured",
                    "step_times_s",
                    "step_tokens",
                )
            },
            "wall_time_s": round(wall, 3),
            "peak_memory_gib": peaks,
            "trainable_elements_per_rank": held,
            "trainable_fingerprints": fingerprints,
            "resumed_from": resume,
            "saved": str(out / final),
            "exported": exported,
            "versions": {
                name: __import__(name).__version__
                for name in ("unsloth", "torch", "transformers", "trl", "peft", "accelerate")
            },
        }
        atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        losses = measured["losses"]
        loss_text = f"loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}" if losses else "no loss logged"
        print(
            f"done: {recipe.name} [{args.mode} x{world_size}] {metrics['steps']} steps, {loss_text}, "
            f"{metrics['tokens_per_second']} tokens/s, {wall:.1f}s; saved {out / final}",
            flush=True,
        )
    close(trainer)
    return 0


def preempted(trainer, record, recipe: Recipe, out: Path, step: int) -> int:
    """SIGTERM: the checkpoint of this step is saved; note it and exit 143 like a terminated process."""
    if trainer.accelerator.is_main_process:
        checkpoint = out / "checkpoints" / f"checkpoint-{step}"
        stopped = {
            "recipe": recipe.name,
            "interrupted": "SIGTERM",
            "steps": step,
            "checkpoint": str(checkpoint),
            "losses": record.losses,
            "wall_time_s": round(time.time() - STARTED, 3),
        }
        atomic.write_text(out / "metrics.json", json.dumps(stopped, indent=2) + "\n")
        print(f"preempted: saved {checkpoint}; run the same recipe again to resume from it", flush=True)
    close(trainer)
    return preemption.EXIT_PREEMPTED


def close(trainer) -> None:
    import torch

    trainer.accelerator.wait_for_everyone()
    # Left to interpreter shutdown, gloo's threads can abort the process ("terminate called
    # without an active exception") after a successful run; close the group while all ranks live.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    try:
        status = run(parse_args(argv))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every output is written and closed and the process group destroyed. Under load, a rank's
        # interpreter teardown can still abort in a native thread's destructor ("terminate called
        # without an active exception", SIGABRT), failing a finished job; leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
