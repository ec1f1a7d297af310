"""What the exports beyond the adapter need before training starts: merged 16-bit weights need
nothing extra; GGUF needs a built llama.cpp (its `llama-quantize` and `convert_hf_to_gguf.py`)
where Unsloth looks for it: $UNSLOTH_LLAMA_CPP_PATH, else ~/.unsloth/llama.cpp. Unsloth would
otherwise try to download and build one after training, which fails offline and in a read-only
container, so a recipe asking for GGUF without it is refused before anything loads.

Shared by the launcher (entrypoint/host.py looks, the plan refuses) and the training program,
which checks again when started directly. Writing the exports is trainer/save.py's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from recipes.errors import BadInput
from recipes.schema import Recipe

QUANTIZERS = ("llama-quantize", "quantize")
CONVERTER = "convert_hf_to_gguf.py"


def llama_cpp_folder(environ: Mapping[str, str]) -> Path:
    configured = environ.get("UNSLOTH_LLAMA_CPP_PATH")
    return Path(configured) if configured else Path.home() / ".unsloth" / "llama.cpp"


def llama_cpp_ready(folder: Path) -> bool:
    """A built llama.cpp: a quantizer that runs and the converter script."""
    return any(os.access(folder / name, os.X_OK) for name in QUANTIZERS) and (folder / CONVERTER).is_file()


def refuse_gguf_without_llama_cpp(recipe: Recipe, folder: Path, ready: bool) -> None:
    if "gguf" in recipe.output.save and not ready:
        raise BadInput(
            f"output.save asks for gguf, but llama.cpp (llama-quantize and {CONVERTER}) is not in "
            f"{str(folder)!r}; build llama.cpp there or point UNSLOTH_LLAMA_CPP_PATH at a built one, "
            f"or remove gguf from output.save (the adapter and merged_16bit need nothing extra)"
        )


def check_possible(recipe: Recipe, environ: Mapping[str, str]) -> None:
    """Look and refuse in one step (the training program, started directly)."""
    folder = llama_cpp_folder(environ)
    refuse_gguf_without_llama_cpp(recipe, folder, llama_cpp_ready(folder))
