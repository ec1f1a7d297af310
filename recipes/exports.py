"""The exports beyond the adapter, and what they need before anything starts.

  merged_16bit         the base model in 16 bits with the adapter merged in: needs nothing extra
  gguf[:QUANT,...]     llama.cpp's format, from the merged model: needs a built llama.cpp (its
                       `convert_hf_to_gguf.py` and `llama-quantize`) in $UNSLOTH_LLAMA_CPP_PATH,
                       else ~/.unsloth/llama.cpp. `make llama-cpp` builds the pinned one
                       (requirements/llama_cpp.py); the image has it in /opt/llama.cpp.
A recipe or an `export` asking for GGUF without llama.cpp is refused before anything loads.

Shared by the launcher (entrypoint/host.py looks, the plan refuses) and the training program,
which checks again when started directly. Writing the exports is trainer/export.py's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from recipes.errors import BadInput, closest

QUANTIZERS = ("llama-quantize", "quantize")
CONVERTER = "convert_hf_to_gguf.py"
# GGUF types: the converter writes the first three itself; llama-quantize makes the rest from f16.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
GGUF_QUANTS = (*CONVERTER_TYPES, "q4_0", "q5_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
KINDS = ("adapter", "merged_16bit", "gguf")


def parse_targets(words: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """`export --to` words -> [(kind, gguf quants)]: adapter, merged_16bit, gguf[:q8_0,q4_k_m]."""
    targets = []
    for word in words:
        kind, _, quants = word.partition(":")
        if kind not in KINDS:
            raise BadInput(f"--to {word!r}: {kind!r} is not an export{closest(kind, KINDS)}; use {', '.join(KINDS)}")
        if quants and kind != "gguf":
            raise BadInput(f"--to {word!r}: only gguf takes quantizations (gguf:q8_0,q4_k_m)")
        names = tuple(q.strip().lower() for q in quants.split(",") if q.strip()) if kind == "gguf" else ()
        for name in names:
            if name not in GGUF_QUANTS:
                raise BadInput(
                    f"--to {word!r}: {name!r} is not a GGUF quantization{closest(name, GGUF_QUANTS)}; "
                    f"use one of {', '.join(GGUF_QUANTS)}"
                )
        targets.append((kind, names or (("q8_0",) if kind == "gguf" else ())))
    return targets


def llama_cpp_folder(environ: Mapping[str, str]) -> Path:
    configured = environ.get("UNSLOTH_LLAMA_CPP_PATH")
    return Path(configured) if configured else Path.home() / ".unsloth" / "llama.cpp"


def llama_cpp_parts(folder: Path) -> frozenset[str]:
    """What a llama.cpp folder holds: "converter" (the script and its Python packages, enough for
    f16, bf16 and q8_0) and "quantizer" (the built llama-quantize, for the other types)."""
    parts = set()
    if (folder / CONVERTER).is_file() and (folder / "gguf-py").is_dir():
        parts.add("converter")
    if any(os.access(folder / name, os.X_OK) for name in QUANTIZERS):
        parts.add("quantizer")
    return frozenset(parts)


def parts_needed(quants: tuple[str, ...] | list[str]) -> frozenset[str]:
    if not quants:
        return frozenset()
    return frozenset({"converter"} | ({"quantizer"} if set(quants) - set(CONVERTER_TYPES) else set()))


def refuse_missing_llama_cpp(
    quants: tuple[str, ...] | list[str], folder: Path, parts: frozenset[str], who: str
) -> None:
    missing = parts_needed(quants) - parts
    if missing:
        what = f"{CONVERTER} and its gguf-py" if "converter" in missing else "a built llama-quantize"
        raise BadInput(
            f"{who} ({', '.join(quants)}), but {what} is not in llama.cpp folder {str(folder)!r}; build the "
            f"pinned llama.cpp there (`make llama-cpp` in a checkout; the image has it) or point "
            f"UNSLOTH_LLAMA_CPP_PATH at a built one, or leave gguf out (adapter and merged_16bit need nothing extra)"
        )


def check_possible(quants: tuple[str, ...], environ: Mapping[str, str]) -> None:
    """Look and refuse in one step (the training program, started directly): the GGUF types
    output.save asks for (OutputConfig.gguf_quants)."""
    folder = llama_cpp_folder(environ)
    refuse_missing_llama_cpp(quants, folder, llama_cpp_parts(folder), "output.save asks for gguf")
