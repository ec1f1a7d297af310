"""Build a random-init model folder offline, from a recipe's `model.random_init` shape.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on the recipe's own data
(with a ChatML chat template), the weights come from a fixed seed. The folder is written to a
temporary name and renamed when complete, under a file lock, so several ranks can ask for it at
once and a crash never leaves half a model behind. The same shape, data and seed give the same
folder name, which is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.gemma3 import Gemma3ImageProcessorPil  # PIL: no torchvision needed

from recipes import atomic
from recipes.runs import Run
from recipes.schema import TINY_IMAGE_TOKENS, TINY_VISION_TOWER, VISION_ARCHITECTURES, RandomInit

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
# gemma3-vision: ChatML whose contents may be lists of parts; an image part becomes Gemma 3's
# <start_of_image>, which its processor expands into the image's soft tokens.
IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
CHATML_WITH_IMAGES = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_for(run: Run, dataset) -> str:
    """The folder or hub id a run loads: a random-init shape is built (once) under the output
    folder, its tokenizer trained on the dataset's text; any other model is the recipe's name."""
    recipe = run.recipe
    spec = recipe.model.random_init
    if spec is None:
        return recipe.model.name
    texts = texts_of(dataset)
    corpus_key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    folder = folder_for(spec, corpus_key, recipe.model.max_seq_length, run.random_models)
    return str(build(spec, texts, folder, recipe.model.max_seq_length))


def texts_of(dataset) -> list[str]:
    """Every string in the shaped rows: the corpus a random-init model's tokenizer learns."""
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for row in dataset:
        collect(row)
    return texts


def folder_for(spec: RandomInit, corpus_key: str, max_seq_length: int, root: Path) -> Path:
    key = json.dumps([spec.model_dump(mode="json"), corpus_key, max_seq_length], sort_keys=True)
    return root / f"{spec.architecture}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _train_tokenizer(texts: Iterable[str], vocab_size: int, images: bool = False):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + (list(IMAGE_TOKENS.values()) if images else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHATML_WITH_IMAGES if images else CHATML,
        padding_side="right",
        **({"extra_special_tokens": IMAGE_TOKENS} if images else {}),
    )


def decoder_shape(spec: RandomInit, tokenizer, max_seq_length: int) -> dict[str, int]:
    """The text decoder's sizes, as every architecture's config names them."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(2048, max_seq_length),
    )


def _gemma3_vision(spec: RandomInit, tokenizer, max_seq_length: int):
    """(config, processor) of a tiny Gemma 3 image-text model around the spec's text decoder."""

    size = TINY_VISION_TOWER["image_size"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        chat_template=CHATML_WITH_IMAGES,
        image_seq_length=TINY_IMAGE_TOKENS,
    )
    config = Gemma3Config(
        text_config=dict(
            **decoder_shape(spec, tokenizer, max_seq_length),
            head_dim=spec.hidden_size // spec.num_attention_heads,
            sliding_window=max_seq_length,
        ),
        vision_config=dict(TINY_VISION_TOWER),
        mm_tokens_per_image=TINY_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    return config, processor


def build(
    spec: RandomInit,
    texts: list[str],
    dest: Path,
    max_seq_length: int,
    write_weights: Callable[[Any, Path], None] | None = None,
) -> Path:
    """Write the model folder at dest (if it is not there yet) and return dest.

    `write_weights(config, folder)` replaces the default (a whole model built in
    float32 on one device, then saved) for shapes too large for that: bench/bigmodel.py writes
    a 70B model's safetensors one tensor at a time."""

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").exists():
            return dest

        vision = spec.architecture in VISION_ARCHITECTURES
        tokenizer = _train_tokenizer(texts, spec.vocab_size, images=vision)
        processor = None
        if vision:
            config, processor = _gemma3_vision(spec, tokenizer, max_seq_length)
        else:
            config = LlamaConfig(
                **decoder_shape(spec, tokenizer, max_seq_length),
                tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                torch_dtype="bfloat16",
            )
        with atomic.folder(dest) as tmp:
            if write_weights is not None:
                tmp.mkdir()
                write_weights(config, tmp)
                config.save_pretrained(tmp)
            else:
                torch.manual_seed(spec.seed)
                # Initialising billions of weights is far faster on a GPU; the result is saved either way.
                device = "cuda" if torch.cuda.is_available() else "cpu"
                with torch.device(device):
                    model = _model_class(config)(config).to(torch.bfloat16)
                model.save_pretrained(tmp)
                del model
            (processor or tokenizer).save_pretrained(tmp)
    return dest


def _model_class(config):

    return Gemma3ForConditionalGeneration if config.model_type == "gemma3" else LlamaForCausalLM
