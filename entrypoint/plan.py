"""Request (the environment) + recipe + Host (this machine's facts) -> a Plan. Pure data:
nothing is read, written or started here.

The plan holds everything the act step needs: the mode and why (entrypoint/decide.py), the
processes, the generated accelerate config, the exact command, the variables added for the
child, and the files to write (the resolved recipe, the accelerate config, the plan itself).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entrypoint import datareport, memory, refusals
from entrypoint.decide import decide
from entrypoint.environment import Cluster, Request
from entrypoint.gpus import Gpu
from entrypoint.host import Host
from recipes import methods, runs
from recipes.catalog import LoadedRecipe, to_yaml
from recipes.modes import SPECS, Mode
from recipes.runs import folder_of, launch_dir
from recipes.schema import Recipe

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "trainer"  # python -m trainer: the per-process training program

# GPUs without bfloat16 (before Ampere): mixed precision falls back to fp16 there.
NO_BF16_MARKERS = ("T4", "V100", "P100", "P40", "K80", "M60", "RTX 20", "GTX", "Quadro RTX", "TITAN V")


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
    generation: str | None = None  # grpo: what generates the completions (vllm, transformers, continuous_batching)
    paged_cache: dict[str, int] | None = None  # continuous batching: its KV cache's blocks, as the trainer sizes it
    writes_output: bool = True  # holds the run folder's lock while it runs (generate only reads)
    resume: dict[str, Any] | None = None  # what resuming the newest whole checkpoint does (recipes/runs.py)
    data: list[dict[str, Any]] = field(default_factory=list)  # what the data is (entrypoint/datareport.py)

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


def disk_needed_gib(est: memory.Estimate, loaded: LoadedRecipe) -> float:
    """Adapter and checkpoints (trainable weights with optimizer state), plus exports."""
    out = loaded.recipe.output
    copies = 1 + (out.keep_checkpoints if out.save_steps else 0)
    params_gib = (est.params_b or 0) * 1e9 / memory.GIB
    exports = 2 * params_gib * ("merged_16bit" in out.save) + 3 * params_gib * ("gguf" in out.save)
    return round(est.trainable_gib * copies + exports + 0.1, 2)


def accelerate_config(num_processes: int, gpus: list[Gpu], precision: str, cluster: Cluster) -> dict[str, Any]:
    """A multi-process config that accelerate's own loader accepts: one machine, or one of several.

    fsdp uses it unchanged: Unsloth's native FSDP2 shards the model itself (modes.FSDP_ENV), and
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


def child_env(mode: Mode, gpus: list[Gpu], pythonpath: str) -> dict[str, str]:
    # The project first, then the caller's PYTHONPATH without a second copy of it (the image sets
    # PYTHONPATH=/app, which is the project: "/app:/app" helps no one).
    rest = [p for p in pythonpath.split(os.pathsep) if p and os.path.normpath(p) != str(PROJECT_ROOT)]
    env = {"PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *dict.fromkeys(rest)]), "PYTHONUNBUFFERED": "1"}
    env.update(SPECS[mode].child_env)
    if not gpus:
        # Explicit CPU run: keep Unsloth (and torch) off any GPU the host might have.
        env.update({"CUDA_VISIBLE_DEVICES": "", "UNSLOTH_FORCE_CPU": "1"})
        return env
    # nvidia-smi numbers GPUs in PCI order; make CUDA agree, so the ids mean the same GPUs.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if not SPECS[mode].multi_process:  # there accelerate sets CUDA_VISIBLE_DEVICES from gpu_ids
        env["CUDA_VISIBLE_DEVICES"] = ",".join(g.id for g in gpus)
    return env


def make(request: Request, loaded: LoadedRecipe, host: Host) -> Plan:
    recipe = loaded.recipe
    est = memory.estimate(recipe, host.model_config, host.model_config_source)
    decision = decide(request, loaded, host.gpus, est)
    mode, chosen, processes = decision.mode, decision.gpus, decision.processes
    refusals.check(request, recipe, host, mode, gpus=len(chosen))
    resume = runs.resume_on(*host.resume, mode, processes, recipe) if host.resume else None
    recipe = resume.applied(recipe) if resume else recipe
    recipe, generation = resolve_generation(recipe, bool(chosen), host.vllm_installed)
    paged = asdict(methods.paged_cache(recipe)) if generation == "continuous_batching" else None
    figures = per_gpu_figures(est, recipe, mode, processes, chosen, request.cluster.nnodes)
    per_gpu = figures["per_gpu_gib"]
    precision = mixed_precision(recipe.model.dtype, chosen)
    out = folder_of(recipe, request.outputs_dir, host.cwd)
    cluster = request.cluster
    launch = launch_dir(out, cluster.node_rank, cluster.nnodes)
    recipe_file = launch / "recipe.yaml"
    resolved = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(out)})})

    program = ["-m", TRAIN_MODULE, "--recipe", str(recipe_file), "--mode", mode, "--mixed-precision", precision]
    files = {str(recipe_file): f"# resolved from {loaded.path} {' '.join(loaded.overrides)}\n" + to_yaml(resolved)}
    config = None
    if SPECS[mode].multi_process:
        config = accelerate_config(processes, chosen, precision, cluster)
        config_file = launch / "accelerate_config.yaml"
        files[str(config_file)] = yaml.safe_dump(config, sort_keys=False)
        command = [host.python, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *program]
    else:
        command = [host.python, *program]

    plan = Plan(
        recipe=loaded.name,
        recipe_file=str(loaded.path),
        mode=mode,
        reason=decision.reason,
        device="cuda" if chosen else "cpu",
        num_processes=processes,
        num_machines=cluster.nnodes,
        machine_rank=cluster.node_rank,
        gpu_ids=[g.id for g in chosen],
        mixed_precision=precision,
        device_map=SPECS[mode].device_map(cuda=bool(chosen)),
        output_dir=str(out),
        accelerate_config=config,
        command=command,
        env=child_env(mode, chosen, request.pythonpath),
        env_unset=list(request.consumed),
        memory=est.as_dict() | figures,
        disk_gib=disk_needed_gib(est, loaded),
        warnings=memory_warnings(est, mode, chosen, per_gpu)
        + merge_warnings(recipe, est, host.ram_available_gib)
        + ([] if resume is None or resume.exact else [f"resuming {resume.describe()}"]),
        files=files,
        generation=generation,
        paged_cache=paged,
        data=[r.as_json() for r in datareport.report(recipe, loaded.samples, host.tokenizer)],
        resume=resume.as_json() if resume else None,
    )
    files[str(launch / "plan.json")] = json.dumps(plan.as_json(), indent=2) + "\n"
    return plan


def resolve_generation(recipe: Recipe, gpu: bool, vllm: bool) -> tuple[Recipe, str | None]:
    """grpo's generation backend, decided here and written into the launched recipe: vLLM (Unsloth's
    fast_inference) on GPUs where it is installed, else transformers' generate."""
    grpo = recipe.training.grpo
    if grpo is None:
        return recipe, None
    chosen = grpo.generation if grpo.generation != "auto" else ("vllm" if gpu and vllm else "transformers")
    training = recipe.training.model_copy(update={"grpo": grpo.model_copy(update={"generation": chosen})})
    return recipe.model_copy(update={"training": training}), chosen


def per_gpu_figures(
    est: memory.Estimate, recipe: Recipe, mode: Mode, processes: int, chosen: list[Gpu], nodes: int
) -> dict[str, Any]:
    """What each GPU holds in the chosen mode, loading and training, and in the other modes that
    could run the recipe on the same GPUs, so the trade is visible."""
    one_gpu = chosen[0].memory_gib if chosen else None
    figures: dict[str, Any] = {
        "load_in": recipe.model.load_in,
        "per_gpu_gib": memory.per_gpu_gib(est, mode, processes, len(chosen), one_gpu),
        "load_per_gpu_gib": memory.load_gib(est, mode, processes, len(chosen)),
        "train_per_gpu_gib": memory.train_gib(est, mode, processes, len(chosen), one_gpu),
    }
    total = len(chosen) * nodes
    others: dict[str, float | None] = {}
    if total > 1 and est.params_b is not None:
        for other in ("ddp", "fsdp", "model"):
            if other == mode or recipe.refused_in(other) or (other == "model" and nodes > 1):
                continue
            shared_by = 1 if other == "model" else total
            others[other] = memory.per_gpu_gib(est, other, shared_by, len(chosen), one_gpu)
    figures["alternatives_per_gpu_gib"] = others
    return figures


def merge_warnings(recipe: Recipe, est: memory.Estimate, ram_gib: float | None) -> list[str]:
    """output.save's merged / GGUF exports merge on the CPU at the end: say now if memory is short
    (the adapter is saved first either way, and `export` can redo the rest on a bigger machine)."""
    if est.params_b is None or ram_gib is None or not set(recipe.output.save) & {"merged_16bit", "gguf"}:
        return []
    needed = memory.merge_memory_gib(est.params_b * 1e9)
    if needed <= ram_gib:
        return []
    return [
        f"output.save merges the {est.params_b:g}B-parameter model on the CPU at the end: ~{needed} GiB of memory, "
        f"but {ram_gib:.1f} GiB is available now; the adapter is saved first, and export can merge it elsewhere"
    ]


def memory_warnings(est: memory.Estimate, mode: Mode, chosen: list[Gpu], per_gpu: float | None) -> list[str]:
    if est.params_b is None:
        return [f"model size unknown ({est.source}); the mode was chosen without a memory estimate"]
    one_gpu = chosen[0].memory_gib if chosen else None
    if SPECS[mode].memory != "split" and chosen and per_gpu is not None and not memory.fits(per_gpu, one_gpu):
        return [
            f"the model needs ~{per_gpu} GiB per process in {mode} mode but a GPU has {one_gpu:g} GiB; "
            f"expect out-of-memory (PARALLELISM=model splits it; fsdp shards it over the processes)"
        ]
    return []
