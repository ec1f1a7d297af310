"""The save phase: the trained weights (the adapter, or the whole model for full fine-tuning),
written whole or not at all (recipes/atomic.py); the exports beyond them are trainer/export.py's.

Under Unsloth's native FSDP2 the weights are sharded over the ranks: every rank must enter
`whole_parameters`, which gathers them to rank 0, and only rank 0 writes. Otherwise every rank
already holds whole weights and only the main process writes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from recipes import atomic


def local_elements(model) -> int:
    """Trainable elements this process holds: all of them under ddp, its shard under fsdp.

    Under fsdp the modules are sharded again first: FSDP2 keeps the root module's parameters
    gathered after a forward pass, so an evaluation at the last step would otherwise be counted
    as holding the root's whole weights.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # a no-op where the module is already sharded
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
    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        yield True
        return
    # Here only: on the CPU backend, unsloth.models (its Triton kernels) adds 15 s to a process's start.
    from unsloth.models.fsdp2_save import fsdp2_gathered

    with fsdp2_gathered(model, trainable_only=trainable_only) as writer:
        yield bool(writer)


def trainable_fingerprint(model) -> str:
    """A hash of every trainable weight: equal on every DDP rank when they stayed in step."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_trained(model, tokenizer, folder: Path) -> None:
    """The adapter that trained (or the whole model, for full fine-tuning), and the tokenizer.

    TRL's DPOTrainer adds a frozen copy of the starting adapter, "ref", as its reference model;
    it is the untrained starting point, not a result (and under fsdp its shards are not gathered).
    """
    with atomic.folder(folder) as tmp:  # a crash never leaves half an adapter
        options = {"selected_adapters": [model.active_adapter]} if hasattr(model, "peft_config") else {}
        model.save_pretrained(str(tmp), **options)
        tokenizer.save_pretrained(str(tmp))
