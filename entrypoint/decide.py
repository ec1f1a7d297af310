"""Which mode, on which GPUs, with how many processes, and why: the launcher's policy.

It reads top to bottom in named steps:
  refuse_nested_launch    the launcher is never a rank of another launcher (the trap included)
  refuse_single_machine   single and model run one process on one machine
  on_the_cpu              CPU_PROCESSES, or no GPU at all
  gpus_in_use             NUM_GPUS (or the cluster's processes per node) of the visible GPUs
  explicit                PARALLELISM names the mode
  auto                    the first candidate that fits: the whole model on each GPU (single / ddp),
                          fsdp over every GPU in use, model over the fewest GPUs (where the method or
                          the data format cannot train under fsdp, or only a split fits)
Each refusal is a BadInput naming the value and the fix. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from entrypoint import memory
from entrypoint.environment import Request
from entrypoint.gpus import Gpu
from recipes.catalog import LoadedRecipe
from recipes.errors import BadInput
from recipes.modes import SPECS, TRAP_EXPLAINED, Mode, too_few_processes


@dataclass(frozen=True)
class Decision:
    mode: Mode
    gpus: list[Gpu]  # the GPUs this machine's processes use (none: the CPU)
    processes: int  # in total, over every machine
    reason: str


@dataclass(frozen=True)
class Situation:
    """What every step looks at: the request, the recipe, the estimate, and (once chosen) the GPUs."""

    request: Request
    loaded: LoadedRecipe
    est: memory.Estimate
    chosen: list[Gpu]  # the GPUs in use on this machine
    asked: str  # the variable that set their number, for messages

    @property
    def nodes(self) -> int:
        return self.request.cluster.nnodes

    @property
    def total(self) -> int:
        return len(self.chosen) * self.nodes

    @property
    def across(self) -> str:
        return f" on each of {self.nodes} machines" if self.nodes > 1 else ""

    @property
    def one_gpu_gib(self) -> float | None:
        return self.chosen[0].memory_gib

    @property
    def size(self) -> str:
        return f"~{self.est.total_gib} GiB" if self.est.params_b is not None else "an unknown size"


def decide(request: Request, loaded: LoadedRecipe, gpus: list[Gpu], est: memory.Estimate) -> Decision:
    """BadInput for every impossible request."""
    refuse_nested_launch(request)
    refuse_single_machine(request)
    if request.cpu_processes is not None or not gpus:
        return on_the_cpu(request, loaded)
    chosen, asked = gpus_in_use(request, gpus)
    situation = Situation(request, loaded, est, chosen, asked)
    if request.parallelism != "auto":
        return explicit(situation, request.parallelism)
    return auto(situation)


def refuse_nested_launch(request: Request) -> None:
    if not request.inside_launcher:
        return
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


def refuse_single_machine(request: Request) -> None:
    cluster = request.cluster
    mode = request.parallelism
    if cluster.nnodes > 1 and mode != "auto" and not SPECS[mode].spans_machines:
        raise BadInput(
            f"PARALLELISM={mode} runs ONE process on ONE machine, but this job spans {cluster.nnodes} "
            f"machines ({cluster.source}); use PARALLELISM=ddp across machines (fsdp for a model too big "
            f"for one GPU), or run on one machine"
        )


def on_the_cpu(request: Request, loaded: LoadedRecipe) -> Decision:
    """CPU_PROCESSES processes on the CPU (gloo), or one when no GPU is visible and that is allowed."""
    mode, nodes = request.parallelism, request.cluster.nnodes
    cpu_allowed = loaded.recipe.allow_cpu or request.allow_cpu
    if request.cpu_processes is None:  # no GPU visible
        if request.num_gpus is not None or (mode != "auto" and mode != "single"):
            asked = f"NUM_GPUS={request.num_gpus}" if request.num_gpus is not None else f"PARALLELISM={mode}"
            raise BadInput(
                f"{asked} needs GPUs but none is visible: did the container get --gpus all "
                f"(docker) or a nvidia.com/gpu limit (Kubernetes)? To try data parallel on the CPU, "
                f"set CPU_PROCESSES=2 instead"
            )
        if not cpu_allowed:
            raise BadInput(
                f"no GPU is visible and recipe {loaded.name} is meant for a GPU: did the container get "
                f"--gpus all? Set ALLOW_CPU=1 to train on the CPU anyway (only tiny models make sense)"
            )
        if nodes > 1:
            raise BadInput(
                f"no GPU is visible on this machine of a {nodes}-machine job; give the pod GPUs, or set "
                f"CPU_PROCESSES to train on the CPU"
            )
        return Decision("single", [], 1, "no GPU visible; the recipe allows the CPU")

    n = request.cpu_processes
    if mode != "auto" and not SPECS[mode].runs_on_cpu:
        raise BadInput(
            f"PARALLELISM={mode} splits a model over GPUs and cannot run on the CPU; unset "
            f"CPU_PROCESSES, or use PARALLELISM=ddp with CPU_PROCESSES"
        )
    if not cpu_allowed:
        raise BadInput(
            f"CPU_PROCESSES is set but recipe {loaded.name} is meant for a GPU; set ALLOW_CPU=1 "
            f"to train it on the CPU anyway"
        )
    if mode == "single" and n > 1:
        raise BadInput(f"PARALLELISM=single runs one process but CPU_PROCESSES={n}; use PARALLELISM=ddp")
    total = n * nodes
    across = f" on each of {nodes} machines" if nodes > 1 else ""
    if mode == "auto" or SPECS[mode].min_processes == 1:  # single, ddp: as many processes as asked
        chosen: Mode = "ddp" if total > 1 else "single"
        return Decision(chosen, [], total, f"CPU_PROCESSES={n}: {n} CPU process(es){across}, gloo")
    if total < SPECS[mode].min_processes:
        raise too_few_processes(
            f"PARALLELISM={mode}", f"CPU_PROCESSES={n}", "set CPU_PROCESSES=2 or more", "PARALLELISM=single"
        )
    load_in = loaded.recipe.model.load_in
    if SPECS[mode].sixteen_bit_on_cpu and load_in != "16bit":
        raise BadInput(
            f"PARALLELISM={mode} on the CPU cannot shard model.load_in={load_in} "
            f"(bitsandbytes weights are quantized on a GPU); set model.load_in=16bit, or train on GPUs"
        )
    reason = f"PARALLELISM={mode}: {n} CPU process(es){across}, the model sharded over {total} (gloo)"
    return Decision(mode, [], total, reason)


def gpus_in_use(request: Request, gpus: list[Gpu]) -> tuple[list[Gpu], str]:
    """The first NUM_GPUS (or the cluster's processes per node, or all) visible GPUs."""
    cluster = request.cluster
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
    return gpus[:wanted], asked


def explicit(s: Situation, mode: Mode) -> Decision:
    wanted = len(s.chosen)
    if mode == "single":
        if s.request.num_gpus is not None and wanted > 1:
            raise BadInput(
                f"PARALLELISM=single uses one GPU but NUM_GPUS={wanted}; use PARALLELISM=ddp "
                f"(data parallel) or PARALLELISM=model (split the model), or NUM_GPUS=1"
            )
        return Decision("single", s.chosen[:1], 1, "PARALLELISM=single")
    spec = SPECS[mode]
    if not spec.multi_process:  # model: one process, the model split over the GPUs in use
        return Decision(mode, s.chosen, 1, f"PARALLELISM={mode}: one process, the model split over {wanted} GPU(s)")
    if s.total < spec.min_processes:
        stated = s.request.num_gpus is not None or s.asked != "NUM_GPUS"
        given = f"{s.asked}={wanted}" if stated else "one visible GPU"
        raise too_few_processes(f"PARALLELISM={mode}", given, "give it 2 or more GPUs", "PARALLELISM=single")
    if s.total == 1:
        return Decision("single", s.chosen, 1, f"PARALLELISM={mode} with one GPU is a single-process run")
    if mode == "fsdp":
        reason = (
            f"PARALLELISM=fsdp over {wanted} GPU(s){s.across}: Unsloth's FSDP2 shards the model over {s.total} ranks"
        )
        return Decision(mode, s.chosen, s.total, reason)
    return Decision(mode, s.chosen, s.total, f"PARALLELISM={mode} over {wanted} GPU(s){s.across}")


def auto(s: Situation) -> Decision:
    """The first candidate that fits, in order; else an error with the numbers and what would help."""
    for candidate in CANDIDATES:
        for decision in candidate(s):
            return decision
    raise nothing_fits(s)


def whole_on_each_gpu(s: Situation) -> Iterator[Decision]:
    if memory.fits(s.est.total_gib, s.one_gpu_gib):
        if s.total == 1:
            yield Decision("single", s.chosen, 1, f"auto: the model ({s.size}) fits one GPU and one GPU is in use")
        else:
            why = f"auto: the model ({s.size}) fits one GPU, so data parallel over {len(s.chosen)}{s.across}"
            yield Decision("ddp", s.chosen, s.total, why)


def sharded_over_every_rank(s: Situation) -> Iterator[Decision]:
    """fsdp over every GPU in use when the sharded share fits: each GPU trains its own batches on its
    share of the model, where model parallel would run the layers one GPU at a time."""
    if s.total < 2 or s.loaded.recipe.refused_in("fsdp") is not None:
        return
    sharded = memory.per_gpu_gib(s.est, "fsdp", s.total, len(s.chosen), s.one_gpu_gib)
    if sharded is not None and memory.fits(sharded, s.one_gpu_gib):
        split = memory.per_gpu_gib(s.est, "model", 1, len(s.chosen), s.one_gpu_gib)
        instead = (
            "model parallel cannot span machines"
            if s.nodes > 1
            else f"model parallel would hold ~{split} GiB on each but run the layers one GPU at a time"
        )
        yield Decision(
            "fsdp",
            s.chosen,
            s.total,
            f"auto: the model ({s.size}) does not fit one {s.one_gpu_gib:g} GiB GPU, so Unsloth's FSDP2 shards it "
            f"over {s.total} processes (~{sharded} GiB each), every GPU training its own batches ({instead})",
        )


def split_over_fewest_gpus(s: Situation) -> Iterator[Decision]:
    """Model parallel over the fewest GPUs whose share fits, where fsdp cannot train the recipe or
    its share does not fit: more GPUs would only add hops between them (one process runs the layers
    in turn) and hold GPUs that other jobs could use."""
    if s.nodes > 1:
        return
    wanted = len(s.chosen)
    counts = [wanted] if s.request.num_gpus is not None else range(2, wanted + 1)
    refused = s.loaded.recipe.refused_in("fsdp")
    if refused is not None:
        why_not_fsdp = f"; fsdp is out: {refused[0]} cannot train under it"
    else:
        sharded = memory.per_gpu_gib(s.est, "fsdp", s.total, wanted, s.one_gpu_gib)
        why_not_fsdp = f"; sharded with fsdp it would need ~{sharded} GiB per GPU" if s.total > 1 else ""
    for k in counts:
        share = memory.per_gpu_gib(s.est, "model", 1, k, s.one_gpu_gib)
        if share is not None and memory.fits(share, s.one_gpu_gib):
            of = f" of the {wanted}" if k < wanted else ""
            yield Decision(
                "model",
                s.chosen[:k],
                1,
                f"auto: the model ({s.size}) does not fit one {s.one_gpu_gib:g} GiB GPU, so one process splits it "
                f"over {k}{of} GPUs (~{share} GiB each){why_not_fsdp}",
            )
            return


CANDIDATES: tuple[Callable[[Situation], Iterator[Decision]], ...] = (
    whole_on_each_gpu,
    sharded_over_every_rank,
    split_over_fewest_gpus,
)


def nothing_fits(s: Situation) -> BadInput:
    full = s.loaded.recipe.model.full_finetuning
    # Full fine-tuning is 16-bit by schema: its lever is the optimizer state, not the load type.
    smaller = "an 8-bit optimizer (training.optimizer=adamw_8bit)" if full else "a 4-bit load (model.load_in=4bit)"
    name, one = s.loaded.name, s.one_gpu_gib
    if s.nodes > 1:
        sharded = memory.per_gpu_gib(s.est, "fsdp", s.total, len(s.chosen), one)
        return BadInput(
            f"recipe {name} needs {s.size}, more than one {one:g} GiB GPU, and sharded over the {s.total} GPUs "
            f"of this job (fsdp) still ~{sharded} GiB per GPU; use {smaller}, a shorter "
            f"model.max_seq_length or batch, or more machines"
        )
    share = memory.per_gpu_gib(s.est, "model", 1, len(s.chosen), one)
    return BadInput(
        f"recipe {name} needs {s.size}, and split over the {len(s.chosen)} GPU(s) in use still ~{share} GiB on each "
        f"{one:g} GiB GPU; use {smaller}, a shorter model.max_seq_length or batch, more GPUs, or set "
        f"PARALLELISM explicitly to try anyway"
    )
