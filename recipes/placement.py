"""Where each mode puts the model, shared by the launcher's plan and the training program.

| mode   | processes       | each process loads                  | sharding                         |
| single | one             | the whole model on its GPU (or CPU) | none                             |
| ddp    | one per GPU     | the whole model on its own GPU      | none: gradients are all-reduced  |
| fsdp   | one per GPU     | the whole model on its own GPU      | Unsloth's native FSDP2 shards it |
|        |                 |                                     | inside Trainer.__init__          |
| model  | one             | a slice of the layers on every GPU  | none: device_map="balanced"      |

Pure: importing this module imports neither torch nor unsloth, except `whole_parameters`,
which is called after training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from recipes.errors import BadInput

Mode = Literal["single", "ddp", "model", "fsdp"]
MODES: tuple[Mode, ...] = ("single", "ddp", "model", "fsdp")
MULTI_PROCESS: tuple[Mode, ...] = ("ddp", "fsdp")  # started by `accelerate launch`, one rank per GPU

# Read by `import unsloth` (unsloth/fsdp2_launch.py): with WORLD_SIZE > 1 Unsloth shards the model
# itself with torch's fully_shard, and accelerate must see a plain multi-process launch, so the
# generated accelerate config stays MULTI_GPU. The backend is named so that an accelerate FSDP
# variable left in the environment cannot silently switch to accelerate's own FSDP wrap.
FSDP_ENV = {"UNSLOTH_FSDP2": "1", "UNSLOTH_FSDP2_BACKEND": "native"}
FSDP_SWITCH = "UNSLOTH_FSDP2"
OFF_WORDS = ("", "0", "false", "no", "off")


def device_map(mode: Mode, cuda: bool, local_rank: int | str = "LOCAL_RANK") -> Any:
    """What a process passes to from_pretrained (the plan shows LOCAL_RANK by name)."""
    if not cuda:
        return "cpu"
    if mode == "model":
        return "balanced"  # one process: accelerate splits the layers over every visible GPU
    if mode == "single":
        return {"": 0}
    return {"": local_rank}  # ddp and fsdp: one whole model on this rank's GPU (fsdp shards it later)


def check_fsdp_switch(mode: Mode, environ: Mapping[str, str]) -> None:
    """UNSLOTH_FSDP2 set by hand would make Unsloth shard a run that asked for another mode."""
    raw = environ.get(FSDP_SWITCH)
    if mode != "fsdp" and raw is not None and raw.strip().lower() not in OFF_WORDS:
        raise BadInput(
            f"{FSDP_SWITCH}={raw!r} is set, which makes Unsloth shard the model with FSDP2, but the mode "
            f"is {mode}; use PARALLELISM=fsdp (the launcher sets {FSDP_SWITCH} itself), or unset {FSDP_SWITCH}"
        )


def check_exports(mode: Mode, save: list[str]) -> None:
    """Merged and GGUF exports merge the whole model in one process, which a sharded model is not."""
    merging = [kind for kind in save if kind != "adapter"]
    if mode == "fsdp" and merging:
        raise BadInput(
            f"output.save={save} asks for {', '.join(merging)}, which merges the whole model in one process, "
            f"but under PARALLELISM=fsdp it is sharded over the processes and only the adapter is saved; "
            f"set output.save=[adapter] (and merge it later in one process), or train with PARALLELISM=ddp "
            f"or model, which export"
        )


def local_elements(model) -> int:
    """Trainable elements this process holds: all of them under ddp, its shard under fsdp."""
    total = 0
    for param in model.parameters():
        if param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor shard
            total += local.numel()
    return total


@contextlib.contextmanager
def whole_parameters(model, trainable_only: bool) -> Iterator[bool]:
    """Yield whether this process now sees whole parameters.

    Unsharded models: every process does (True). Under Unsloth's native FSDP2 every rank must
    enter: the shards are gathered one parameter at a time (to the CPU) and only rank 0 sees
    whole tensors until the block ends; the others get False and must not write.
    `trainable_only` gathers just the trainable parameters, enough for an adapter.
    """
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        yield True  # checked first: unsloth.models imports its Triton kernels, unneeded here
        return
    from unsloth.models.fsdp2_save import fsdp2_gathered

    with fsdp2_gathered(model, trainable_only=trainable_only) as writer:
        yield bool(writer)
