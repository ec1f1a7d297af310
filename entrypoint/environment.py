"""The environment contract: variables -> a validated `Request`. Pure: reads a mapping only.

| variable        | values                                              | default |
| PARALLELISM     | auto, single, ddp, model (balanced, model-parallel, mp) | auto |
| NUM_GPUS        | a positive integer, or all                          | all     |
| CPU_PROCESSES   | train on the CPU with this many processes (gloo)    | unset   |
| ALLOW_CPU       | 1/true: let any recipe run without a GPU            | unset   |
| RECIPE          | the recipe when the command line names none         | unset   |
| OUTPUTS_DIR     | folder that holds one sub-folder per recipe run     | outputs |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from recipes.errors import BadInput, closest

Mode = Literal["single", "ddp", "model"]
Parallelism = Literal["auto", "single", "ddp", "model"]

PARALLELISM_ALIASES: dict[str, Parallelism] = {
    "auto": "auto",
    "single": "single",
    "ddp": "ddp",
    "data": "ddp",
    "data-parallel": "ddp",
    "model": "model",
    "balanced": "model",
    "model-parallel": "model",
    "mp": "model",
}

# Set by torchrun / accelerate / torch.distributed.launch for each process they start. Cluster
# operators (Kubeflow's PyTorchJob sets WORLD_SIZE and RANK on every pod) never set these, so
# they, and only they, mean "this process is already one rank of a multi-process launch".
PER_PROCESS_VARIABLES = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Request:
    parallelism: Parallelism = "auto"
    num_gpus: int | None = None  # None: every visible GPU
    cpu_processes: int | None = None
    allow_cpu: bool = False
    recipe: str | None = None
    outputs_dir: str = "outputs"
    inside_launcher: str | None = None  # the per-process variable that gave it away


def _positive_int(name: str, raw: str, fix: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadInput(f"{name}={raw!r} is not a number; {fix}") from None
    if value <= 0:
        raise BadInput(f"{name}={raw!r} must be at least 1; {fix}")
    return value


def parse_flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise BadInput(f"{name}={raw!r} is not a yes/no value; use 1 or 0")


def parse_parallelism(raw: str | None) -> Parallelism:
    word = (raw or "auto").strip().lower()
    if word in PARALLELISM_ALIASES:
        return PARALLELISM_ALIASES[word]
    choices = "auto, single, ddp, model (also balanced, model-parallel, mp)"
    raise BadInput(f"PARALLELISM={raw!r} is not a mode{closest(word, PARALLELISM_ALIASES)}; use one of {choices}")


def parse_num_gpus(raw: str | None) -> int | None:
    if raw is None or raw.strip().lower() in ("", "all"):
        return None
    return _positive_int("NUM_GPUS", raw, "use a GPU count such as NUM_GPUS=2, or NUM_GPUS=all")


def read(environ: Mapping[str, str]) -> Request:
    cpu_raw = environ.get("CPU_PROCESSES")
    cpu_processes = None
    if cpu_raw not in (None, ""):
        cpu_processes = _positive_int(
            "CPU_PROCESSES", cpu_raw, "give the number of CPU training processes, e.g. CPU_PROCESSES=2"
        )
    inside = next((v for v in PER_PROCESS_VARIABLES if environ.get(v, "") != ""), None)
    return Request(
        parallelism=parse_parallelism(environ.get("PARALLELISM")),
        num_gpus=parse_num_gpus(environ.get("NUM_GPUS")),
        cpu_processes=cpu_processes,
        allow_cpu=parse_flag("ALLOW_CPU", environ.get("ALLOW_CPU")),
        recipe=environ.get("RECIPE") or None,
        outputs_dir=environ.get("OUTPUTS_DIR") or "outputs",
        inside_launcher=inside,
    )
