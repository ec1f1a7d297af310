"""Random-init weights for shapes too large to build as one model (70B in bf16 is 128 GiB; the
default builder instantiates the whole model in float32 on one device, 256 GiB).

Each tensor is drawn on a GPU and its bytes go straight into a safetensors shard; several shards
are written at once, spread over the visible GPUs. Nothing larger than one tensor is ever held.
Used as `random_model.build(..., write_weights=bigmodel.write_weights)` by bench/settings.py.
"""

from __future__ import annotations

import json
import math
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STD = 0.02  # LlamaConfig.initializer_range: what a fresh LlamaForCausalLM draws its weights from
LAYERS_PER_SHARD = 4  # 70B: 4 layers are 6.4 GiB, a shard size the hub uses too
SEED = 0
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every saved tensor, from the model built on the meta device (no memory)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def shard_plan(names: list[str]) -> dict[str, list[str]]:
    """File name -> tensor names: the embeddings, every LAYERS_PER_SHARD decoder layers, the rest."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = LAYER.match(name)
        key = f"layers-{int(match.group(1)) // LAYERS_PER_SHARD:03d}" if match else name.split(".")[-2]
        groups.setdefault(key, []).append(name)
    count = len(groups)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": group for i, group in enumerate(groups.values())}


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], device: str, seed: int) -> int:
    """One safetensors file (8-byte header length, JSON header, raw bytes); returns its data size."""
    import torch

    header: dict[str, dict] = {}
    offset = 0
    for name in names:
        size = math.prod(shapes[name]) * 2  # bf16
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
    generator = torch.Generator(device).manual_seed(seed)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16, device=device)  # as LlamaRMSNorm starts
            else:
                tensor = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, STD, generator=generator)
            f.write(tensor.reshape(-1).view(torch.uint8).cpu().numpy().data)
    return offset


def write_weights(config, folder: Path) -> None:
    """The `write_weights` hook of random_model.build: shards plus model.safetensors.index.json."""
    import torch

    shapes = tensor_shapes(config)
    plan = shard_plan(list(shapes))
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    # Two writers per GPU keep each GPU drawing while the other thread copies and writes.
    with ThreadPoolExecutor(max_workers=min(len(plan), 2 * len(devices))) as pool:
        jobs = [
            pool.submit(write_shard, folder / file, names, shapes, devices[i % len(devices)], SEED + i)
            for i, (file, names) in enumerate(plan.items())
        ]
        total = sum(job.result() for job in jobs)
    index = {"metadata": {"total_size": total}, "weight_map": {n: file for file, names in plan.items() for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
