"""Exports of a run, in one process, after a run of any mode (fsdp included):

    python -m trainer.export --run OUTPUT_FOLDER --to merged_16bit gguf:q8_0,q4_k_m

The launcher's `export` command checks the request and starts it (entrypoint/cli.py); the
training program calls `export_run` itself at the end for `output.save`.

  adapter        the adapter, from the newest checkpoint when training stopped before saving one
  merged_16bit   the base model in 16 bits, on the CPU, with the adapter merged in: merged_16bit/
                 (a 4-bit or model-parallel run's adapter merges into the 16-bit base weights; an
                 image-text model's whole, with its processor)
  gguf:QUANTS    llama.cpp's converter on the merged (or fully fine-tuned) model, then its
                 llama-quantize for the k-quants: gguf/<recipe>-<quant>.gguf
Each folder is written whole or not at all (recipes/atomic.py); exports.json lists what was
written, with sizes and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import PeftModel

from recipes import atomic, exports
from recipes.errors import EXIT_BAD_INPUT, BadInput
from recipes.runs import Run
from trainer import export_check

# What a checkpoint holds besides the adapter and the tokenizer: only resuming needs it.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state*", "trainer_state.json", "training_args.bin")


def adapter_from_checkpoint(run: Run) -> Path:
    """The adapter: the run's own, else its newest checkpoint's (training stopped early)."""
    dest = run.adapter
    if run.trained is not None:
        return dest
    assert run.checkpoint is not None  # the launcher refused a run with neither
    with atomic.folder(dest) as tmp:
        shutil.copytree(run.checkpoint, tmp, ignore=shutil.ignore_patterns(*TRAINING_STATE))
    return dest


def auto_classes(vision: bool):
    """transformers' (model, tokenizer or processor) classes for a run's model."""
    if vision:
        return transformers.AutoModelForImageTextToText, transformers.AutoProcessor
    return transformers.AutoModelForCausalLM, transformers.AutoTokenizer


def merge(run: Run, adapter: Path, dest: Path) -> Path:
    """The base model (the one the adapter was trained on, in 16 bits: Run.merge_base) with the
    adapter merged in; an image-text model's vision tower included, and its processor beside it."""
    model_class, tokenizer_class = auto_classes(run.vision)
    trust_remote_code = run.trust_remote_code
    base_name = run.merge_base()
    base = model_class.from_pretrained(
        base_name, dtype=torch.bfloat16, device_map="cpu", trust_remote_code=trust_remote_code
    )
    if getattr(base.config, "quantization_config", None) is not None:
        raise BadInput(
            f"the base model {base_name} is stored quantized, so its 16-bit weights are not there to merge into; "
            f"train from the 16-bit model (e.g. without the -bnb-4bit suffix) and load it with model.load_in=4bit"
        )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tokenizer = tokenizer_class.from_pretrained(str(adapter), trust_remote_code=trust_remote_code)
    with atomic.folder(dest) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return dest


def convert(model: Path, out: Path, outtype: str, llama_cpp: Path) -> None:
    """llama.cpp's converter, through trainer/gguf_convert.py (which knows our random-init tokenizers)."""
    command = [sys.executable, "-m", "trainer.gguf_convert", str(llama_cpp), str(model), "--outfile", str(out)]
    run_tool([*command, "--outtype", outtype], f"convert_hf_to_gguf.py --outtype {outtype}")


def run_tool(command: list[str], name: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def gguf(model: Path, dest: Path, name: str, quants: tuple[str, ...], llama_cpp: Path) -> list[Path]:
    """One GGUF file per quantization in dest/: the converter's own types directly, the others by
    llama-quantize from an f16 file (kept only when f16 was asked for)."""
    written = []
    with atomic.folder(dest) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        f16 = tmp / f"{name}-f16.gguf"
        if any(q not in exports.CONVERTER_TYPES for q in quants) or "f16" in quants:
            convert(model, f16, "f16", llama_cpp)
        for quant in quants:
            target = tmp / f"{name}-{quant}.gguf"
            if quant in exports.CONVERTER_TYPES and quant != "f16":
                convert(model, target, quant, llama_cpp)
            elif quant != "f16":
                quantizer = next(llama_cpp / q for q in exports.QUANTIZERS if os.access(llama_cpp / q, os.X_OK))
                run_tool([str(quantizer), str(f16), str(target), quant.upper()], f"llama-quantize {quant}")
            written.append(dest / target.name)
        if "f16" not in quants:
            f16.unlink(missing_ok=True)
    return written


def export_run(
    run: Run, targets: list[tuple[str, tuple[str, ...]]], llama_cpp: Path, check: bool = True, unchecked_by: str = ""
) -> list[dict]:
    """Write each target into the run's folder, then check each merged / GGUF one against the trained
    model (trainer/export_check.py), unless `check` is off (by `unchecked_by`, the option that said so);
    returns what was written, with the checks (also in exports.json)."""
    records = []
    full = run.recipe.model.full_finetuning
    with tempfile.TemporaryDirectory(dir=run.folder, prefix=".export-") as scratch:
        merged_dir: Path | None = run.weights if full else None
        for kind, quants in targets:
            started = time.time()
            if kind == "adapter":
                paths = [adapter_from_checkpoint(run)]
            elif kind == "merged_16bit":
                merged_dir = merge(run, adapter_from_checkpoint(run), run.merged)
                paths = [merged_dir]
            else:
                if merged_dir is None:  # GGUF alone: merge into scratch space, not merged_16bit/
                    adapter = adapter_from_checkpoint(run)
                    merged_dir = merge(run, adapter, Path(scratch) / "merged")
                paths = gguf(merged_dir, run.gguf, str(run.recipe.name), quants, llama_cpp)
            seconds = round(time.time() - started, 2)
            records += [{"kind": kind, "path": str(p), "bytes": size_of(p), "seconds": seconds} for p in paths]
    if check:
        export_check.check_exports(run, records, llama_cpp)
    else:
        for record in records:
            if record["kind"] != "adapter":
                record["check"] = {"skipped": unchecked_by or "--no-check"}
    previous = json.loads(run.exports.read_text()) if run.exports.is_file() else []
    kept = [r for r in previous if r["path"] not in {n["path"] for n in records}]
    atomic.write_text(run.exports, json.dumps(kept + records, indent=2) + "\n")
    return records


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.export", description=__doc__)
    parser.add_argument("--run", required=True, help="the run's output folder")
    parser.add_argument("--to", nargs="+", required=True, metavar="KIND", help="adapter, merged_16bit, gguf[:Q,...]")
    parser.add_argument("--no-check", action="store_true", help="do not check the exports against the trained model")
    args = parser.parse_args(argv)
    try:
        run = Run.read(Path(args.run))
        targets = exports.parse_targets(args.to)
        records = export_run(run, targets, exports.llama_cpp_folder(os.environ), check=not args.no_check)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for record in records:
        print(
            f"exported {record['kind']}: {record['path']} ({record['bytes'] / 1024**2:.1f} MiB, {record['seconds']} s)"
            + checked(record.get("check"))
        )
    return report_failures(records)


def checked(check: dict | None) -> str:
    """How an export's check went, for its line (the figures are in exports.json)."""
    if not check:
        return ""
    if "skipped" in check:
        return f"; not checked ({check['skipped']})"
    if "error" in check:
        return "; check FAILED"
    verdict = "checked" if check["ok"] else "check FAILED"
    return f"; {verdict}: perplexity ratio {export_check.number(check['ratio'])} (±{check['tolerance']:g})"


def report_failures(records: list[dict]) -> int:
    """Exit 1, one line per target that failed its check (the files stay, for a look)."""
    lines = export_check.failure_lines(records)
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
