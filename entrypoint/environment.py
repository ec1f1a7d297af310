"""The environment contract: variables -> a validated `Request`. Pure: reads a mapping only.

| variable        | values                                              | default |
| PARALLELISM     | auto, single, ddp, fsdp (fsdp2, sharded), model (balanced, model-parallel, mp) | auto |
| NUM_GPUS        | a positive integer, or all                          | all     |
| CPU_PROCESSES   | train on the CPU with this many processes (gloo)    | unset   |
| ALLOW_CPU       | 1/true: let any recipe run without a GPU            | unset   |
| RECIPE          | the recipe when the command line names none         | unset   |
| OUTPUTS_DIR     | folder that holds one sub-folder per recipe run     | outputs |

Several machines (ddp and fsdp only), first match wins for each value:
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

Parallelism = Literal["auto", "single", "ddp", "model", "fsdp"]

PARALLELISM_ALIASES: dict[str, Parallelism] = {
    "auto": "auto",
    "single": "single",
    "ddp": "ddp",
    "data": "ddp",
    "data-parallel": "ddp",
    "fsdp": "fsdp",
    "fsdp2": "fsdp",
    "sharded": "fsdp",
    "model": "model",
    "balanced": "model",
    "model-parallel": "model",
    "mp": "model",
}

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
FALSE_WORDS = ("", "0", "false", "no", "off")


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
    outputs_dir: str = "outputs"
    inside_launcher: str | None = None  # the per-process variable that gave it away
    cluster: Cluster = Cluster()


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
    choices = "auto, single, ddp, fsdp (also fsdp2, sharded), model (also balanced, model-parallel, mp)"
    raise BadInput(f"PARALLELISM={raw!r} is not a mode{closest(word, PARALLELISM_ALIASES)}; use one of {choices}")


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
        outputs_dir=environ.get("OUTPUTS_DIR") or "outputs",
        inside_launcher=inside,
        cluster=read_cluster(environ),
    )
