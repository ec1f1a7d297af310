"""The one gate between this machine and the planner: every fact the plan needs about the host,
read here, then handed to the pure planner (entrypoint/plan.py) as data.

| fact                          | read from                                                    |
| GPUs                          | nvidia-smi and the *_VISIBLE_DEVICES variables, or --assume-gpus |
| the model's config.json       | a local folder, the Hugging Face cache, or one GET to the hub |
| the model's tokenizer files   | a local folder or the Hugging Face cache (never the hub)     |
| llama.cpp (for GGUF exports)  | $UNSLOTH_LLAMA_CPP_PATH or ~/.unsloth/llama.cpp               |
| memory available (merging)    | /proc/meminfo                                                |
| vLLM (GRPO's generation)      | whether the package is installed (not imported)              |
| the checkpoint to resume      | the run folder's newest whole checkpoint and its checkpoint.json |
| the working directory, Python | the process                                                  |
The variables of the environment contract are read by entrypoint/environment.py (a Request).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from entrypoint import gpus as gpu_inventory
from entrypoint import hub
from entrypoint.gpus import Gpu
from recipes import exports, runs
from recipes.schema import Recipe


@dataclass(frozen=True)
class Host:
    gpus: list[Gpu]
    cwd: str
    python: str = sys.executable  # the interpreter the child runs with
    model_config: dict | None = None  # config.json, when found
    model_config_source: str = ""  # where it was found ("config.json of X" [+ " from the hub"])
    llama_cpp_folder: Path = Path("~/.unsloth/llama.cpp")
    llama_cpp_parts: frozenset[str] = frozenset()  # "converter", "quantizer", "checker" (recipes/exports.py)
    ram_available_gib: float | None = None  # None: unknown
    vllm_installed: bool = False  # GRPO generates with vLLM where it is (found, not imported)
    note: str | None = None  # something the user should know (the hub was not reachable, ...)
    tokenizer: hub.TokenizerFiles | None = None  # the model's tokenizer, where it is on this machine
    resume: tuple[Path, dict] | None = None  # the whole checkpoint a run resumes from, and its checkpoint.json


def gather(
    environ: Mapping[str, str],
    recipe: Recipe,
    cwd: str,
    assume_gpus: str | None = None,
    python: str = sys.executable,
    ask_hub: bool = True,
    model: str | None = None,
) -> Host:
    """Everything the plan needs from this machine. `assume_gpus` ("4x80") plans for another one;
    `ask_hub=False` never touches the network (the hub is also skipped offline, by hub.py);
    `model` looks up that model's config.json instead of the recipe's (a run's base, locally)."""
    found = gpu_inventory.assumed(assume_gpus) if assume_gpus else gpu_inventory.discover(environ)
    if model is not None:
        config, note = hub.cached_config(model, environ), None
        source = f"config.json of {model}" if config is not None else ""
    elif ask_hub:
        config, source, note = hub.find_config(recipe, environ)
    else:
        (config, source), note = hub.local_config(recipe, environ), None
    folder = exports.llama_cpp_folder(environ)
    return Host(
        gpus=found,
        cwd=cwd,
        python=python,
        model_config=config,
        model_config_source=source,
        llama_cpp_folder=folder,
        llama_cpp_parts=exports.llama_cpp_parts(folder),
        ram_available_gib=ram_available_gib(),
        vllm_installed=importlib.util.find_spec("vllm") is not None,
        note=note,
        tokenizer=tokenizer_files(recipe, environ),
        resume=resume_facts(recipe, environ, cwd),
    )


def resume_facts(recipe: Recipe, environ: Mapping[str, str], cwd: str) -> tuple[Path, dict] | None:
    """The whole checkpoint a run of the recipe would resume from, and what it records of the launch
    that wrote it (recipes/runs.py); None when it starts fresh."""
    if not recipe.output.resume:
        return None
    checkpoint = runs.newest_checkpoint(runs.folder_of(recipe, environ.get("OUTPUTS_DIR"), cwd) / runs.CHECKPOINTS)
    facts = runs.whole(checkpoint) if checkpoint is not None else None
    return (checkpoint, facts) if checkpoint is not None and facts is not None else None


def tokenizer_files(recipe: Recipe, environ: Mapping[str, str]) -> hub.TokenizerFiles | None:
    """The recipe's tokenizer where it is local (a model folder, the cache); a random-init model's is
    trained on the data when the run starts, so there is none yet."""
    if recipe.model.random_init is not None:
        return None
    return hub.cached_tokenizer(recipe.model.name, environ)


def ram_available_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024**2, 1)  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
