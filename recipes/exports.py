"""Exports beyond the adapter: merged 16-bit weights and GGUF (through llama.cpp).

GGUF needs a built llama.cpp (its `llama-quantize` and `convert_hf_to_gguf.py`) where Unsloth
looks for it: $UNSLOTH_LLAMA_CPP_PATH, else ~/.unsloth/llama.cpp. Unsloth would otherwise try
to download and build one after training, which fails offline and in a read-only container,
so `check_possible` refuses such a recipe before anything loads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from recipes import atomic
from recipes.errors import BadInput
from recipes.schema import Recipe

QUANTIZERS = ("llama-quantize", "quantize")
CONVERTER = "convert_hf_to_gguf.py"


def llama_cpp_folder(environ: Mapping[str, str]) -> Path:
    configured = environ.get("UNSLOTH_LLAMA_CPP_PATH")
    return Path(configured) if configured else Path.home() / ".unsloth" / "llama.cpp"


def check_possible(recipe: Recipe, environ: Mapping[str, str]) -> None:
    if "gguf" not in recipe.output.save:
        return
    folder = llama_cpp_folder(environ)
    has_quantizer = any(os.access(folder / name, os.X_OK) for name in QUANTIZERS)
    if not (has_quantizer and (folder / CONVERTER).is_file()):
        raise BadInput(
            f"output.save asks for gguf, but llama.cpp (llama-quantize and {CONVERTER}) is not in "
            f"{str(folder)!r}; build llama.cpp there or point UNSLOTH_LLAMA_CPP_PATH at a built one, "
            f"or remove gguf from output.save (the adapter and merged_16bit need nothing extra)"
        )


def write(model, tokenizer, out: Path, recipe: Recipe) -> list[str]:
    """Write each requested export whole (temp folder, then swap it in); return the folders."""
    written = []
    for kind in recipe.output.save:
        if kind == "adapter":
            continue  # saved by the training program itself
        dest = out / kind
        with atomic.folder(dest) as tmp:
            if kind == "merged_16bit":
                model.save_pretrained_merged(str(tmp), tokenizer, save_method="merged_16bit")
            else:
                model.save_pretrained_gguf(str(tmp), tokenizer, quantization_method=recipe.output.gguf_quantization)
        written.append(str(dest))
    return written
