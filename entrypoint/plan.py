"""Environment + recipe + GPU inventory -> a Plan. Pure data: nothing is written or started.

The plan holds everything the act step needs: the mode and why, the processes, the
generated accelerate config, the exact command, the variables added for the child, and the
files to write (the resolved recipe, the accelerate config, the plan itself).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entrypoint import memory
from entrypoint.environment import CLUSTER_VARIABLES, Cluster, Request
from entrypoint.gpus import Gpu
from recipes import exports, placement
from recipes.catalog import LoadedRecipe, to_yaml
from recipes.errors import BadInput
from recipes.placement import Mode

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "recipes.train"

# GPUs without bfloat16 (before Ampere): mixed precision falls back to fp16 there.
NO_BF16_MARKERS = ("T4", "V100", "P100", "P40", "K80", "M60", "RTX 20", "GTX", "Quadro RTX", "TITAN V")

TRAP_EXPLAINED = (
    "model parallel (device_map='balanced') splits ONE model over the GPUs of ONE process; "
    "under a multi-process launch each rank would load its own split copy and training fails "
    "with \"You can't train a model that has been loaded with device_map='auto' in any distributed mode\""
)


@dataclass(frozen=True)
class Plan:
    recipe: str
    recipe_file: str
    mode: Mode
    reason: str
    device: str  # "cuda" or "cpu"
    num_processes: int  # in total, over all machines
    num_machines: int
    machine_rank: int
    gpu_ids: list[str]
    mixed_precision: str
    device_map: Any  # what each process passes to from_pretrained
    output_dir: str
    accelerate_config: dict[str, Any] | None
    command: list[str]
    env: dict[str, str]
    env_unset: list[str]  # cluster variables the launcher consumed; the child must not see them
    memory: dict[str, Any]
    disk_gib: float = 0.1  # free space the outputs need, checked before anything starts
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # path -> text, written by the act step

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = sorted(self.files)
        return data


def mixed_precision(recipe_dtype: str, gpus: list[Gpu]) -> str:
    if not gpus or recipe_dtype == "float32":
        return "no"
    if recipe_dtype == "float16":
        return "fp16"
    if recipe_dtype == "bfloat16":
        return "bf16"
    old = any(marker in gpu.name for gpu in gpus for marker in NO_BF16_MARKERS)
    return "fp16" if old else "bf16"


def _cpu_allowed(loaded: LoadedRecipe, request: Request) -> bool:
    return loaded.recipe.allow_cpu or request.allow_cpu


def choose(
    request: Request, loaded: LoadedRecipe, gpus: list[Gpu], est: memory.Estimate
) -> tuple[Mode, list[Gpu], int, str]:
    """-> (mode, chosen GPUs, processes, reason). BadInput for every impossible request."""
    name = loaded.name
    if request.inside_launcher:
        if request.parallelism == "model":
            raise BadInput(
                f"PARALLELISM=model refused: {request.inside_launcher} is set, so this is already one "
                f"process of a multi-process launch (torchrun / accelerate launch), and {TRAP_EXPLAINED}. "
                f"Run the image as a plain command with PARALLELISM=model (one process), or use "
                f"PARALLELISM=ddp for data parallel"
            )
        raise BadInput(
            f"the launcher is running inside another launcher ({request.inside_launcher} is set); it "
            f"starts the training processes itself: run it as a plain command with PARALLELISM and "
            f"NUM_GPUS instead of under torchrun / accelerate launch"
        )

    cluster = request.cluster
    nodes = cluster.nnodes
    if nodes > 1 and request.parallelism in ("model", "single"):
        raise BadInput(
            f"PARALLELISM={request.parallelism} runs ONE process on ONE machine, but this job spans {nodes} "
            f"machines ({cluster.source}); use PARALLELISM=ddp across machines (fsdp for a model too big "
            f"for one GPU), or run on one machine"
        )
    across = f" on each of {nodes} machines" if nodes > 1 else ""

    if request.cpu_processes is not None:
        if request.parallelism == "model":
            raise BadInput(
                "PARALLELISM=model splits a model over GPUs and cannot run on the CPU; unset "
                "CPU_PROCESSES, or use PARALLELISM=ddp with CPU_PROCESSES"
            )
        if not _cpu_allowed(loaded, request):
            raise BadInput(
                f"CPU_PROCESSES is set but recipe {name} is meant for a GPU; set ALLOW_CPU=1 "
                f"to train it on the CPU anyway"
            )
        n = request.cpu_processes
        if request.parallelism == "single" and n > 1:
            raise BadInput(f"PARALLELISM=single runs one process but CPU_PROCESSES={n}; use PARALLELISM=ddp")
        total = n * nodes
        if request.parallelism == "fsdp":
            _check_fsdp(total, f"CPU_PROCESSES={n}", "set CPU_PROCESSES=2 or more")
            if loaded.recipe.model.load_in != "16bit":
                raise BadInput(
                    f"PARALLELISM=fsdp on the CPU cannot shard model.load_in={loaded.recipe.model.load_in} "
                    f"(bitsandbytes weights are quantized on a GPU); set model.load_in=16bit, or train on GPUs"
                )
            reason = f"PARALLELISM=fsdp: {n} CPU process(es){across}, the model sharded over {total} (gloo)"
            return "fsdp", [], total, reason
        mode: Mode = "ddp" if total > 1 else "single"
        return mode, [], total, f"CPU_PROCESSES={n}: {n} CPU process(es){across}, gloo"

    if not gpus:
        if request.num_gpus is not None or request.parallelism in ("ddp", "model", "fsdp"):
            asked = (
                f"NUM_GPUS={request.num_gpus}" if request.num_gpus is not None else f"PARALLELISM={request.parallelism}"
            )
            raise BadInput(
                f"{asked} needs GPUs but none is visible: did the container get --gpus all "
                f"(docker) or a nvidia.com/gpu limit (Kubernetes)? To try data parallel on the CPU, "
                f"set CPU_PROCESSES=2 instead"
            )
        if not _cpu_allowed(loaded, request):
            raise BadInput(
                f"no GPU is visible and recipe {name} is meant for a GPU: did the container get "
                f"--gpus all? Set ALLOW_CPU=1 to train on the CPU anyway (only tiny models make sense)"
            )
        if nodes > 1:
            raise BadInput(
                f"no GPU is visible on this machine of a {nodes}-machine job; give the pod GPUs, or set "
                f"CPU_PROCESSES to train on the CPU"
            )
        return "single", [], 1, "no GPU visible; the recipe allows the CPU"

    if request.num_gpus is not None:
        wanted, asked = request.num_gpus, "NUM_GPUS"
    elif cluster.nproc_per_node is not None:
        wanted, asked = cluster.nproc_per_node, "PET_NPROC_PER_NODE"
    else:
        wanted, asked = len(gpus), "NUM_GPUS"
    if wanted > len(gpus):
        ids = ",".join(g.id for g in gpus)
        raise BadInput(
            f"{asked}={wanted} but only {len(gpus)} GPU(s) are visible ({ids}); lower {asked} "
            f"or expose more GPUs (--gpus all, CUDA_VISIBLE_DEVICES, nvidia.com/gpu)"
        )
    chosen = gpus[:wanted]
    total = wanted * nodes
    one = chosen[0].memory_gib
    size = f"~{est.total_gib} GiB" if est.params_b is not None else "an unknown size"

    if request.parallelism == "single":
        if request.num_gpus is not None and wanted > 1:
            raise BadInput(
                f"PARALLELISM=single uses one GPU but NUM_GPUS={wanted}; use PARALLELISM=ddp "
                f"(data parallel) or PARALLELISM=model (split the model), or NUM_GPUS=1"
            )
        return "single", chosen[:1], 1, "PARALLELISM=single"
    if request.parallelism == "ddp":
        if total == 1:
            return "single", chosen, 1, "PARALLELISM=ddp with one GPU is a single-process run"
        return "ddp", chosen, total, f"PARALLELISM=ddp over {wanted} GPU(s){across}"
    if request.parallelism == "fsdp":
        given = f"{asked}={wanted}" if request.num_gpus is not None or asked != "NUM_GPUS" else "one visible GPU"
        _check_fsdp(total, given, "give it 2 or more GPUs")
        reason = f"PARALLELISM=fsdp over {wanted} GPU(s){across}: Unsloth's FSDP2 shards the model over {total} ranks"
        return "fsdp", chosen, total, reason
    if request.parallelism == "model":
        return "model", chosen, 1, f"PARALLELISM=model: one process, the model split over {wanted} GPU(s)"

    # auto
    if memory.fits(est.total_gib, one):
        if total == 1:
            return "single", chosen, 1, f"auto: the model ({size}) fits one GPU and one GPU is in use"
        return "ddp", chosen, total, f"auto: the model ({size}) fits one GPU, so data parallel over {wanted}{across}"
    sharded = memory.per_gpu_gib(est, "fsdp", total, wanted, one)
    full = loaded.recipe.model.full_finetuning
    # Full fine-tuning is 16-bit by schema: its lever is the optimizer state, not the load type.
    smaller = "an 8-bit optimizer (training.optimizer=adamw_8bit)" if full else "a 4-bit load (model.load_in=4bit)"
    if (nodes > 1 or full) and total > 1 and sharded is not None and memory.fits(sharded, one):
        why = "model parallel cannot span machines" if nodes > 1 else "full fine-tuning shards its trainable state"
        return (
            "fsdp",
            chosen,
            total,
            f"auto: the model ({size}) does not fit one {one:g} GiB GPU and {why}, so Unsloth's FSDP2 "
            f"shards it over {total} processes (~{sharded} GiB each)",
        )
    if nodes > 1:
        raise BadInput(
            f"recipe {name} needs {size}, more than one {one:g} GiB GPU, and sharded over the {total} GPUs "
            f"of this job (fsdp) still ~{sharded} GiB per GPU; use {smaller}, a shorter "
            f"model.max_seq_length or batch, or more machines"
        )
    # Model parallel over the fewest GPUs whose share fits: more would only add hops between them
    # (one process runs the layers in turn) and hold GPUs that other jobs could use.
    counts = [wanted] if request.num_gpus is not None else range(2, wanted + 1)
    for k in counts:
        share = memory.per_gpu_gib(est, "model", 1, k, one)
        if share is not None and memory.fits(share, one):
            of = f" of the {wanted}" if k < wanted else ""
            return (
                "model",
                chosen[:k],
                1,
                f"auto: the model ({size}) does not fit one {one:g} GiB GPU, so one process splits it over "
                f"{k}{of} GPUs (~{share} GiB each)",
            )
    share = memory.per_gpu_gib(est, "model", 1, wanted, one)
    raise BadInput(
        f"recipe {name} needs {size}, and split over the {wanted} GPU(s) in use still ~{share} GiB on each "
        f"{one:g} GiB GPU; use {smaller}, a shorter model.max_seq_length or batch, more GPUs, or set "
        f"PARALLELISM explicitly to try anyway"
    )


def _check_fsdp(total: int, asked: str, fix: str) -> None:
    if total < 2:
        raise BadInput(
            f"PARALLELISM=fsdp shards the model over several processes, but {asked} gives one; {fix}, "
            f"or use PARALLELISM=single for one process"
        )


def disk_needed_gib(est: memory.Estimate, loaded: LoadedRecipe) -> float:
    """Adapter and checkpoints (trainable weights with optimizer state), plus exports."""
    out = loaded.recipe.output
    copies = 1 + (out.keep_checkpoints if out.save_steps else 0)
    params_gib = (est.params_b or 0) * 1e9 / memory.GIB
    exports = 2 * params_gib * ("merged_16bit" in out.save) + 3 * params_gib * ("gguf" in out.save)
    return round(est.trainable_gib * copies + exports + 0.1, 2)


def accelerate_config(num_processes: int, gpus: list[Gpu], precision: str, cluster: Cluster) -> dict[str, Any]:
    """A multi-process config that accelerate's own loader accepts: one machine, or one of several.

    fsdp uses it unchanged: Unsloth's native FSDP2 shards the model itself (placement.FSDP_ENV), and
    an accelerate FSDP config would make accelerate wrap the model a second time.
    """
    several = cluster.nnodes > 1
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": cluster.nnodes,
        "machine_rank": cluster.node_rank,
        "num_processes": num_processes,  # in total, over every machine
        # accelerate turns gpu_ids into CUDA_VISIBLE_DEVICES for the children, so these are the
        # ids as the parent sees them (indices or UUIDs), not renumbered ones.
        "gpu_ids": ",".join(g.id for g in gpus) if gpus else "all",
        "mixed_precision": precision,
        # One machine: 0 lets accelerate pick a free port. Several: every machine must agree.
        "main_process_ip": cluster.master_addr if several else None,
        "main_process_port": cluster.master_port if several else 0,
        "rdzv_backend": cluster.rdzv_backend,
        "same_network": True,
        "use_cpu": False,
        "main_training_function": "main",
        "debug": False,
    }


def child_env(mode: Mode, gpus: list[Gpu], environ: dict[str, str]) -> dict[str, str]:
    # The project root first, once: the image's own PYTHONPATH already names it.
    inherited = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PROJECT_ROOT)]
    env = {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *inherited]), "PYTHONUNBUFFERED": "1"}
    if mode == "fsdp":
        env.update(placement.FSDP_ENV)
    if not gpus:
        # Explicit CPU run: keep Unsloth (and torch) off any GPU the host might have.
        env.update({"CUDA_VISIBLE_DEVICES": "", "UNSLOTH_FORCE_CPU": "1"})
        return env
    # nvidia-smi numbers GPUs in PCI order; make CUDA agree, so the ids mean the same GPUs.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if mode not in placement.MULTI_PROCESS:  # there accelerate sets CUDA_VISIBLE_DEVICES from gpu_ids
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g.id for g in gpus)
    return env


def output_dir_for(loaded: LoadedRecipe, request: Request, cwd: str) -> Path:
    configured = loaded.recipe.output.dir
    path = Path(configured) if configured else Path(request.outputs_dir) / loaded.name
    return path if path.is_absolute() else Path(cwd) / path


def make(
    request: Request,
    loaded: LoadedRecipe,
    gpus: list[Gpu],
    environ: dict[str, str],
    cwd: str,
    python: str = sys.executable,
    hub_config: dict | None = None,
) -> Plan:
    """`hub_config`: the model's config.json as read from the hub by the act step, if it was."""
    exports.check_possible(loaded.recipe, environ)
    est = memory.estimate(loaded.recipe, environ, hub_config)
    mode, chosen, processes, reason = choose(request, loaded, gpus, est)
    placement.check_fsdp_switch(mode, environ)
    placement.check_exports(mode, loaded.recipe.output.save)
    one_gpu = chosen[0].memory_gib if chosen else None
    per_gpu = memory.per_gpu_gib(est, mode, processes, len(chosen), one_gpu)
    device = "cuda" if chosen else "cpu"
    precision = mixed_precision(loaded.recipe.model.dtype, chosen)
    out = output_dir_for(loaded, request, cwd)
    cluster = request.cluster
    # Machines of one job may share the output folder: each writes its own launch files.
    launch_dir = out / "launch" / (f"node-{cluster.node_rank}" if cluster.nnodes > 1 else "")
    recipe_file = launch_dir / "recipe.yaml"
    resolved = loaded.recipe.model_copy(update={"output": loaded.recipe.output.model_copy(update={"dir": str(out)})})

    program = ["-m", TRAIN_MODULE, "--recipe", str(recipe_file), "--mode", mode, "--mixed-precision", precision]
    files = {str(recipe_file): f"# resolved from {loaded.path} {' '.join(loaded.overrides)}\n" + to_yaml(resolved)}
    config = None
    if mode in placement.MULTI_PROCESS:
        config = accelerate_config(processes, chosen, precision, cluster)
        config_file = launch_dir / "accelerate_config.yaml"
        files[str(config_file)] = yaml.safe_dump(config, sort_keys=False)
        command = [python, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *program]
    else:
        command = [python, *program]

    warnings = []
    if est.params_b is None:
        warnings.append(f"model size unknown ({est.source}); the mode was chosen without a memory estimate")
    elif mode != "model" and chosen and per_gpu is not None and not memory.fits(per_gpu, one_gpu):
        warnings.append(
            f"the model needs ~{per_gpu} GiB per process in {mode} mode but a GPU has {one_gpu:g} GiB; "
            f"expect out-of-memory (PARALLELISM=model splits it; fsdp shards it over the processes)"
        )

    plan = Plan(
        recipe=loaded.name,
        recipe_file=str(loaded.path),
        mode=mode,
        reason=reason,
        device=device,
        num_processes=processes,
        num_machines=cluster.nnodes,
        machine_rank=cluster.node_rank,
        gpu_ids=[g.id for g in chosen],
        mixed_precision=precision,
        device_map=placement.device_map(mode, cuda=bool(chosen)),
        output_dir=str(out),
        accelerate_config=config,
        command=command,
        env=child_env(mode, chosen, environ),
        env_unset=[name for name in CLUSTER_VARIABLES if name in environ],
        memory=est.as_dict() | {"per_gpu_gib": per_gpu},
        disk_gib=disk_needed_gib(est, loaded),
        warnings=warnings,
        files=files,
    )
    files[str(launch_dir / "plan.json")] = json.dumps(plan.as_json(), indent=2) + "\n"
    return plan
