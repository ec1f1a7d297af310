"""The exports beyond the adapter, and what they need before anything starts.

  merged_16bit         the base model in 16 bits with the adapter merged in: needs nothing extra
  gguf[:QUANT,...]     llama.cpp's format, from the merged model: needs a built llama.cpp (its
                       `convert_hf_to_gguf.py` and `llama-quantize`; `llama-perplexity` and
                       `llama-completion` to check each file, unless --no-check) in $UNSLOTH_LLAMA_CPP_PATH,
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
# What checks a GGUF file after export (trainer/export_check.py): its perplexity, and its embedded
# chat template rendering prompts.
CHECKERS = ("llama-perplexity", "llama-completion")
# GGUF types: the converter writes the first three itself; llama-quantize makes the rest from f16.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
GGUF_QUANTS = (*CONVERTER_TYPES, "q4_0", "q5_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
KINDS = ("adapter", "merged_16bit", "gguf")
# How far an export's perplexity on held-out rows may stray from the trained model's, |ratio - 1|,
# before its check fails the export (trainer/export_check.py). Measured on the smoke recipe (three
# runs: 10 and 60 steps, two seeds), the largest |ratio - 1| was: merged_16bit 0.0016, f16 0.0009,
# bf16 0.0005, q8_0 0.0025, q6_k 0.0025, q5_0 0.012, q5_k_m 0.038, q4_k_m 0.020, q4_k_s 0.040,
# q4_0 0.027, q3_k_m 0.085, q2_k 0.027 (its 64-wide tensors do not fit the 256-wide k-quant blocks,
# so llama-quantize falls back to other types there). Each tolerance leaves room above that and
# above what each type costs a real model (llama.cpp's own tables: q8_0 well under 1%, q4_k_m a few
# %, q2_k tens of %), while a damaged tokenizer gave 1.9 to 2.3 there (README.md).
CHECK_TOLERANCE = {
    "merged_16bit": 0.02,
    "f16": 0.02,
    "bf16": 0.02,
    "q8_0": 0.03,
    "q6_k": 0.05,
    "q5_k_m": 0.08,
    "q5_0": 0.08,
    "q4_k_m": 0.12,
    "q4_k_s": 0.12,
    "q4_0": 0.15,
    "q3_k_m": 0.3,
    "q2_k": 1.0,
}


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
    f16, bf16 and q8_0), "quantizer" (the built llama-quantize, for the other types) and "checker"
    (the built llama-perplexity and llama-completion, which check each GGUF file written)."""
    parts = set()
    if (folder / CONVERTER).is_file() and (folder / "gguf-py").is_dir():
        parts.add("converter")
    if any(os.access(folder / name, os.X_OK) for name in QUANTIZERS):
        parts.add("quantizer")
    if all(os.access(folder / name, os.X_OK) for name in CHECKERS):
        parts.add("checker")
    return frozenset(parts)


def parts_needed(quants: tuple[str, ...] | list[str], check: bool = True) -> frozenset[str]:
    if not quants:
        return frozenset()
    quantizer = {"quantizer"} if set(quants) - set(CONVERTER_TYPES) else set()
    return frozenset({"converter"} | quantizer | ({"checker"} if check else set()))


MISSING = {
    "converter": f"{CONVERTER} and its gguf-py are",
    "quantizer": "a built llama-quantize is",
    "checker": f"the built {' and '.join(CHECKERS)} (which check each GGUF file against the trained model) are",
}


def refuse_missing_llama_cpp(
    quants: tuple[str, ...] | list[str], folder: Path, parts: frozenset[str], who: str, check: bool = True
) -> None:
    missing = parts_needed(quants, check) - parts
    if missing:
        what = next(MISSING[part] for part in MISSING if part in missing)
        only_checker = missing == {"checker"}
        skip = ", or skip the check (export --no-check; in a recipe output.check=false)" if only_checker else ""
        raise BadInput(
            f"{who} ({', '.join(quants)}), but {what} not in llama.cpp folder {str(folder)!r}; build the "
            f"pinned llama.cpp there (`make llama-cpp` in a checkout; the image has it) or point "
            f"UNSLOTH_LLAMA_CPP_PATH at a built one{skip}, or leave gguf out (adapter and merged_16bit need "
            f"nothing extra)"
        )


def check_possible(quants: tuple[str, ...], environ: Mapping[str, str], check: bool = True) -> None:
    """Look and refuse in one step (the training program, started directly): the GGUF types
    output.save asks for (OutputConfig.gguf_quants), and whether they are checked (output.check)."""
    folder = llama_cpp_folder(environ)
    refuse_missing_llama_cpp(quants, folder, llama_cpp_parts(folder), "output.save asks for gguf", check)
