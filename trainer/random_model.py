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

from recipes import atomic
from recipes.schema import RandomInit

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]


def folder_for(spec: RandomInit, corpus_key: str, max_seq_length: int, root: Path) -> Path:
    key = json.dumps([spec.model_dump(mode="json"), corpus_key, max_seq_length], sort_keys=True)
    return root / f"{spec.architecture}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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
        chat_template=CHATML,
        padding_side="right",
    )


def build(
    spec: RandomInit,
    texts: list[str],
    dest: Path,
    max_seq_length: int,
    write_weights: Callable[[Any, Path], None] | None = None,
) -> Path:
    """Write the model folder at dest (if it is not there yet) and return dest.

    `write_weights(config, folder)` replaces the default (a whole LlamaForCausalLM built in
    float32 on one device, then saved) for shapes too large for that: bench/bigmodel.py writes
    a 70B model's safetensors one tensor at a time."""
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "config.json").exists():
            return dest
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _train_tokenizer(texts, spec.vocab_size)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=max(2048, max_seq_length),
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
                    model = LlamaForCausalLM(config).to(torch.bfloat16)
                model.save_pretrained(tmp)
                del model
            tokenizer.save_pretrained(tmp)
    return dest
