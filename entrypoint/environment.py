"""The environment contract: variables -> a validated `Request`. Pure: reads a mapping only.

`CONTRACT` below is the one list of the launcher's own variables (the CLI's help prints it; a
test holds README's table to it). Several machines (ddp and fsdp only), first match wins:
| value          | ours          | Kubeflow Trainer v2 / torchrun | Kubeflow PyTorchJob             |
| nodes          | NNODES        | PET_NNODES                     | WORLD_SIZE / PET_NPROC_PER_NODE |
| this node      | NODE_RANK     | PET_NODE_RANK                  | RANK (the pod's index)          |
| main address   | MASTER_ADDR   | PET_MASTER_ADDR                | MASTER_ADDR                     |
| main port      | MASTER_PORT   | PET_MASTER_PORT                | MASTER_PORT (default 29500)     |
| GPUs per node  | NUM_GPUS      | PET_NPROC_PER_NODE (int/auto)  | PET_NPROC_PER_NODE              |
| rendezvous     | RDZV_ENDPOINT | PET_RDZV_ENDPOINT (+ PET_RDZV_BACKEND, default c10d)             |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from recipes.errors import BadInput, closest
from recipes.modes import FSDP_SWITCH, OFF_WORDS, SPECS, Mode
from recipes.runs import DEFAULT_OUTPUTS_DIR

Parallelism = Literal["auto"] | Mode

# Every word PARALLELISM accepts -> its mode; the aliases come from the mode table.
PARALLELISM_ALIASES: dict[str, Parallelism] = {"auto": "auto"} | {
    word: name for name, spec in SPECS.items() for word in (name, *spec.aliases)
}


@dataclass(frozen=True)
class Variable:
    """One row of the contract, in README's markdown (backticks); the CLI's help drops them."""

    name: str
    values: str
    default: str
    meaning: str

    def markdown(self) -> str:
        return f"| `{self.name}` | {self.values} | {self.default} | {self.meaning} |"


def _mode_values() -> str:
    words = [
        f"`{n}`" + (f" (aliases {', '.join(f'`{a}`' for a in s.aliases)})" if s.aliases else "")
        for n, s in SPECS.items()
    ]
    return ", ".join(["`auto`", *words])


MODE_WORDS = _mode_values().replace("`", "")  # for messages

# The launcher's own variables: README's environment table shows exactly these rows (tested).
CONTRACT = (
    Variable("PARALLELISM", _mode_values(), "`auto`", "how to use the GPUs"),
    Variable(
        "NUM_GPUS",
        "positive integer, or `all`",
        "`all` visible",
        "GPUs per machine (the first N visible). `1` under `ddp` is `single`",
    ),
    Variable(
        "CPU_PROCESSES",
        "positive integer",
        "unset",
        "train on the CPU with N processes per machine (gloo), under `ddp` (default) or `fsdp`; tiny recipes and tests",
    ),
    Variable("ALLOW_CPU", "`1` / `0`", "`0`", "let a GPU recipe train on the CPU when no GPU is visible"),
    Variable("RECIPE", "bundled name or YAML path", "unset", "the recipe when the command line names none"),
    Variable(
        "OUTPUTS_DIR",
        "folder",
        f"`{DEFAULT_OUTPUTS_DIR}` (image: `/workspace/outputs`)",
        "each run writes `OUTPUTS_DIR/<recipe name>/` unless the recipe sets `output.dir`",
    ),
    Variable(
        "TAKE_OVER_LOCK",
        "`1` / `0`",
        "`0`",
        "take over the lock of a run folder that a job on another machine held and left (see What survives what)",
    ),
)


def contract_help() -> str:
    """The contract for the command line's --help: the values, then what the variable does."""
    width = max(len(v.name) for v in CONTRACT)
    rows = [f"  {v.name:<{width}}  {v.values} (default: {v.default})\n  {'':<{width}}  {v.meaning}" for v in CONTRACT]
    return ("environment:\n" + "\n".join(rows) + "\n").replace("`", "")


# Set by torchrun / accelerate / torch.distributed.launch for each process they start. Cluster
# operators (Kubeflow's PyTorchJob sets WORLD_SIZE and RANK on every pod) never set these, so
# they, and only they, mean "this process is already one rank of a multi-process launch".
PER_PROCESS_VARIABLES = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
# Cluster variables the launcher consumes. The child never sees them: a pod-level WORLD_SIZE=8
# would make a single-process child believe it is one rank of eight, and torchrun sets its own.
CLUSTER_VARIABLES = (
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV_ENDPOINT",
    "WORLD_SIZE",
    "RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
    "PET_NPROC_PER_NODE",
    "PET_RDZV_ENDPOINT",
    "PET_RDZV_BACKEND",
    "PET_RDZV_ID",
    "PET_MAX_RESTARTS",
)

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = OFF_WORDS


@dataclass(frozen=True)
class Cluster:
    """Where this launcher sits among the machines of one job."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    rdzv_backend: str = "static"  # "c10d" when the cluster gives a rendezvous endpoint
    nproc_per_node: int | None = None  # the cluster's word on processes per node; None: auto
    source: str = "single machine"


@dataclass(frozen=True)
class Request:
    parallelism: Parallelism = "auto"
    num_gpus: int | None = None  # None: every visible GPU
    cpu_processes: int | None = None
    allow_cpu: bool = False
    recipe: str | None = None
    outputs_dir: str = DEFAULT_OUTPUTS_DIR
    inside_launcher: str | None = None  # the per-process variable that gave it away
    cluster: Cluster = Cluster()
    fsdp_switch: str | None = None  # UNSLOTH_FSDP2 as set by hand (the plan refuses it under other modes)
    pythonpath: str = ""  # the child's PYTHONPATH starts from it
    consumed: tuple[str, ...] = ()  # cluster variables that are set: the child must not see them


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
    raise BadInput(f"PARALLELISM={raw!r} is not a mode{closest(word, PARALLELISM_ALIASES)}; use one of {MODE_WORDS}")


def parse_num_gpus(raw: str | None) -> int | None:
    if raw is None or raw.strip().lower() in ("", "all"):
        return None
    return _int("NUM_GPUS", raw, "use a GPU count such as NUM_GPUS=2, or NUM_GPUS=all", minimum=1)


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """(name, value) of the first variable that is set and not empty."""
    return next(((n, environ[n]) for n in names if environ.get(n, "").strip() != ""), None)


def _int(name: str, raw: str, fix: str, minimum: int = 0) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadInput(f"{name}={raw!r} is not a whole number; {fix}") from None
    if value < minimum:
        raise BadInput(f"{name}={raw!r} must be at least {minimum}; {fix}")
    return value


def _port(name: str, raw: str) -> int:
    value = _int(name, raw, "give a TCP port between 1 and 65535, e.g. 29500", minimum=1)
    if value > 65535:
        raise BadInput(f"{name}={raw!r} is not a port; give a TCP port between 1 and 65535, e.g. 29500")
    return value


def read_cluster(environ: Mapping[str, str]) -> Cluster:
    nproc = None
    found = _first(environ, "PET_NPROC_PER_NODE")
    if found and found[1].strip().lower() not in ("auto", "gpu"):
        nproc = _int(*found, "use a number of processes per node, or auto", minimum=1)

    nodes = _first(environ, "NNODES", "PET_NNODES")
    # PyTorchJob's pod-level WORLD_SIZE/RANK; inside a launcher they are per-process instead.
    inside = any(environ.get(v, "") != "" for v in PER_PROCESS_VARIABLES)
    pytorchjob = bool(environ.get("WORLD_SIZE")) and environ.get("RANK") is not None and not nodes and not inside
    if nodes:
        nnodes = _int(*nodes, "give the number of machines, e.g. NNODES=2", minimum=1)
        source = "NNODES / NODE_RANK" if nodes[0] == "NNODES" else "Kubeflow Trainer / torchrun (PET_*)"
    elif pytorchjob:
        world = _int("WORLD_SIZE", environ["WORLD_SIZE"], "Kubeflow sets it to the total process count", minimum=1)
        nnodes = max(1, world // (nproc or 1))
        source = "Kubeflow PyTorchJob (WORLD_SIZE / RANK)"
    else:
        nnodes, source = 1, "single machine"

    rank_names = ("NODE_RANK", "PET_NODE_RANK") + (("RANK",) if pytorchjob else ())
    rank = _first(environ, *rank_names)
    node_rank = _int(*rank, "give this machine's index, 0 for the main one") if rank else 0
    if node_rank >= nnodes:
        raise BadInput(
            f"{rank[0] if rank else 'NODE_RANK'}={node_rank} is outside 0..{nnodes - 1} for {nnodes} "
            f"machine(s); give each machine a distinct rank from 0 to {nnodes - 1}"
        )

    addr = _first(environ, "MASTER_ADDR", "PET_MASTER_ADDR")
    port = _first(environ, "MASTER_PORT", "PET_MASTER_PORT")
    rdzv = _first(environ, "RDZV_ENDPOINT", "PET_RDZV_ENDPOINT")
    master_addr = addr[1].strip() if addr else None
    master_port = _port(*port) if port else 29500
    backend = "static"
    if rdzv:
        host, sep, rdzv_port = rdzv[1].strip().rpartition(":")
        if not sep or not host:
            raise BadInput(f"{rdzv[0]}={rdzv[1]!r} is not HOST:PORT; write it like {rdzv[0]}=trainer-0:29400")
        master_addr, master_port = host, _port(rdzv[0] + " port", rdzv_port)
        backend = environ.get("PET_RDZV_BACKEND", "").strip() or "c10d"
    if nnodes > 1 and not master_addr:
        raise BadInput(
            f"{nnodes} machines ({source}) but MASTER_ADDR is not set; set MASTER_ADDR to the address "
            f"of the machine with NODE_RANK=0 (and MASTER_PORT, default 29500) on every machine"
        )
    return Cluster(nnodes, node_rank, master_addr, master_port, backend, nproc, source)


def read(environ: Mapping[str, str]) -> Request:
    cpu_raw = environ.get("CPU_PROCESSES")
    cpu_processes = None
    if cpu_raw not in (None, ""):
        cpu_processes = _int(
            "CPU_PROCESSES", cpu_raw, "give the number of CPU training processes, e.g. CPU_PROCESSES=2", minimum=1
        )
    inside = next((v for v in PER_PROCESS_VARIABLES if environ.get(v, "") != ""), None)
    return Request(
        parallelism=parse_parallelism(environ.get("PARALLELISM")),
        num_gpus=parse_num_gpus(environ.get("NUM_GPUS")),
        cpu_processes=cpu_processes,
        allow_cpu=parse_flag("ALLOW_CPU", environ.get("ALLOW_CPU")),
        recipe=environ.get("RECIPE") or None,
        outputs_dir=environ.get("OUTPUTS_DIR") or DEFAULT_OUTPUTS_DIR,
        inside_launcher=inside,
        cluster=read_cluster(environ),
        fsdp_switch=environ.get(FSDP_SWITCH),
        pythonpath=environ.get("PYTHONPATH", ""),
        consumed=tuple(name for name in CLUSTER_VARIABLES if name in environ),
    )
