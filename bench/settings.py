"""One set of training settings for every stack the benchmark compares, and its inputs:
a random-init Llama-architecture model and a synthetic text dataset, both built offline.

The launcher stack gets these through a recipe; the bare Unsloth and plain transformers
scripts read them from here directly, so all three train the same thing.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipes.schema import DEFAULT_TARGET_MODULES, RandomInit  # noqa: E402

SHAPES = {
    # For checking the benchmark itself on a CPU in seconds; never reported.
    "tiny": RandomInit(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=32000, seed=0
    ),
    # TinyLlama-1.1B's shape.
    "1b": RandomInit(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        seed=0,
    ),
    # Llama-3-8B's layers with a 32k vocabulary (a tokenizer trained offline cannot reach 128k): 7.0B.
    "8b": RandomInit(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        seed=0,
    ),
    # Llama-3.3-70B's layers (the bundled llama-3.3-70b-lora-model-parallel recipe's model) with
    # the same 32k vocabulary: 69.0B parameters, 128.5 GiB in bf16, more than any one GPU holds.
    "70b": RandomInit(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        seed=0,
    ),
    # Qwen3-4B's sizes (the bundled qwen3-4b-grpo-gsm8k recipe's model) with the Llama architecture, for
    # bench/grpo.py: 36 layers, 32 query heads and 8 KV heads of 128 (HEAD_DIM: 32 x 128 = 4096 is not the hidden
    # size, 2560, as in Qwen3), its 151936-token vocabulary (the embeddings hold every row; an offline tokenizer
    # learns a few thousand) and untied embeddings: 4.41B parameters, where Qwen3-4B ties them for 4.02B.
    "qwen3-4b": RandomInit(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=151936,
        seed=0,
    ),
}
# random_init has no head_dim (it takes hidden_size / num_attention_heads, 80 for qwen3-4b); LlamaConfig takes one,
# so bench/grpo.py sets it in the config of the model it builds.
HEAD_DIM = {"qwen3-4b": 128}
# Shapes whose weights are written tensor by tensor from the GPU (bench/bigmodel.py): building
# them as one float32 model would need twice their bf16 size on one device.
BIG = ("70b",)
SEQ_LEN = 2048
BATCH = 4
LORA_R = 16
LORA_ALPHA = 16
TARGET_MODULES = list(DEFAULT_TARGET_MODULES)
LEARNING_RATE = 2e-4
OPTIMIZER = "adamw_8bit"
WARMUP = 5
SEED = 3407
WORDS_PER_ROW = 2600  # > SEQ_LEN tokens once tokenized: every row fills the sequence, no padding


def _words(rng: random.Random) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(30_000)]


def vocabulary(seed: int = 0) -> list[str]:
    """The 30k pseudo-words of the synthetic rows: enough distinct words for a 32k BPE, which the
    benchmark models' tokenizers learn (bench/chats.py builds chats of them)."""
    return _words(random.Random(seed))


def synthetic_rows(count: int, seed: int = 0) -> list[str]:
    """Rows of pseudo-words from the vocabulary."""
    rng = random.Random(seed)
    vocab = _words(rng)
    return [" ".join(rng.choices(vocab, k=WORDS_PER_ROW)) for _ in range(count)]


def prepare(size: str, steps: int, work: Path, models: Path | None = None) -> tuple[Path, Path]:
    """-> (model folder, data file); built once per size and reused. `models`: where the model
    folders go (default: work/models), e.g. a RAM disk for a 70B model."""
    from trainer import random_model

    work.mkdir(parents=True, exist_ok=True)
    data = work / f"synthetic-{steps * BATCH + 16}.jsonl"
    rows = synthetic_rows(steps * BATCH + 16)
    if not data.exists():
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    spec = SHAPES[size]
    folder = random_model.folder_for(spec, data.name, SEQ_LEN, models or work / "models")
    writer = None
    if size in BIG:
        import bigmodel

        writer = bigmodel.write_weights
    random_model.build(spec, rows, folder, SEQ_LEN, write_weights=writer)
    return folder, data


def sft_config_kwargs(output_dir: str, steps: int) -> dict:
    """SFTConfig arguments every stack uses."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        weight_decay=0.01,
        optim=OPTIMIZER,
        seed=SEED,
        bf16=True,
        logging_steps=5,  # each logged loss is a GPU sync; recipes default to 10
        report_to=[],
        save_strategy="no",
        max_length=SEQ_LEN,
        packing=False,
        dataset_text_field="text",
        dataloader_num_workers=0,
    )
