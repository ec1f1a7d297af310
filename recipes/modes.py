"""What each way of using the GPUs is: one table, read by the launcher's planner, the memory
estimate and the training program. Adding a mode is one entry here (and its tests).

| mode   | processes   | started by        | each GPU holds                     | across machines |
| single | one         | python            | the whole model                    | no              |
| ddp    | one per GPU | accelerate launch | the whole model, its own batches   | yes             |
| fsdp   | one per GPU | accelerate launch | a share of it (Unsloth's FSDP2)    | yes             |
| model  | one         | python            | a slice of the layers              | no              |

Pure: no torch, no I/O. Messages that more than one program prints are written here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from recipes.errors import BadInput

Mode = Literal["single", "ddp", "model", "fsdp"]

# Read by `import unsloth` (unsloth/fsdp2_launch.py): with WORLD_SIZE > 1 Unsloth shards the model
# itself with torch's fully_shard, and accelerate must see a plain multi-process launch, so the
# generated accelerate config stays MULTI_GPU. The backend is named so that an accelerate FSDP
# variable left in the environment cannot silently switch to accelerate's own FSDP wrap.
FSDP_SWITCH = "UNSLOTH_FSDP2"
FSDP_ENV = {FSDP_SWITCH: "1", "UNSLOTH_FSDP2_BACKEND": "native"}
OFF_WORDS = ("", "0", "false", "no", "off")  # also the environment contract's "no" words

TRAP_EXPLAINED = (
    "model parallel (device_map='balanced') splits ONE model over the GPUs of ONE process; "
    "under a multi-process launch each rank would load its own split copy and training fails "
    "with \"You can't train a model that has been loaded with device_map='auto' in any distributed mode\""
)


@dataclass(frozen=True)
class Spec:
    name: Mode
    aliases: tuple[str, ...]  # other PARALLELISM words for it
    multi_process: bool  # one process per GPU under `accelerate launch`; else one plain process
    spans_machines: bool
    runs_on_cpu: bool
    placement: Literal["first", "own", "balanced"]  # the GPU(s) a process loads onto
    memory: Literal["whole", "split", "sharded"]  # what one GPU holds (entrypoint/memory.py)
    min_processes: int = 1
    child_env: Mapping[str, str] = field(default_factory=dict)
    sixteen_bit_on_cpu: bool = False  # bitsandbytes weights are quantized on a GPU only
    sharded_load: bool = False  # each process reads only its share of 16-bit weights (Unsloth's sharded loading)

    def device_map(self, cuda: bool, local_rank: int | str = "LOCAL_RANK") -> Any:
        """What a process passes to from_pretrained (the plan shows LOCAL_RANK by name)."""
        if not cuda:
            return "cpu"
        return {"first": {"": 0}, "own": {"": local_rank}, "balanced": "balanced"}[self.placement]


SPECS: dict[Mode, Spec] = {
    spec.name: spec
    for spec in (
        Spec("single", (), multi_process=False, spans_machines=False, runs_on_cpu=True, placement="first",
             memory="whole"),
        Spec("ddp", ("data", "data-parallel"), multi_process=True, spans_machines=True, runs_on_cpu=True,
             placement="own", memory="whole"),
        # Each rank reads only its share of a 16-bit model's linear weights (a 4/8-bit model whole);
        # Unsloth's FSDP2 shards the rest inside Trainer.__init__.
        Spec("fsdp", ("fsdp2", "sharded"), multi_process=True, spans_machines=True, runs_on_cpu=True,
             placement="own", memory="sharded", min_processes=2, child_env=FSDP_ENV, sixteen_bit_on_cpu=True,
             sharded_load=True),
        # One process: accelerate splits the layers over every visible GPU.
        Spec("model", ("balanced", "model-parallel", "mp"), multi_process=False, spans_machines=False,
             runs_on_cpu=False, placement="balanced", memory="split"),
    )
}  # fmt: skip
MODES: tuple[Mode, ...] = tuple(SPECS)
MULTI_PROCESS: tuple[Mode, ...] = tuple(name for name, spec in SPECS.items() if spec.multi_process)


def too_few_processes(who: str, asked: str, fix: str, single: str) -> BadInput:
    """fsdp with one process has nothing to shard over (Unsloth would quietly train unsharded).

    `who` is how the mode was asked for (PARALLELISM=fsdp, --mode fsdp), `asked` what gave one
    process, `single` how to ask for one process instead."""
    return BadInput(
        f"{who} shards the model over the processes of a multi-process launch, but {asked} gives one; "
        f"{fix}, or use {single} for one process"
    )


def refuse_fsdp_switch(mode: Mode, raw: str | None) -> None:
    """UNSLOTH_FSDP2 (its value as set by hand, or None) would make Unsloth shard a run that asked
    for another mode."""
    if FSDP_SWITCH not in SPECS[mode].child_env and raw is not None and raw.strip().lower() not in OFF_WORDS:
        raise BadInput(
            f"{FSDP_SWITCH}={raw!r} is set, which makes Unsloth shard the model with FSDP2, but the mode "
            f"is {mode}; use PARALLELISM=fsdp (the launcher sets {FSDP_SWITCH} itself), or unset {FSDP_SWITCH}"
        )
