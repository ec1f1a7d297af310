"""GPU inventory without importing torch: nvidia-smi, filtered the way CUDA will filter it.

`discover` asks nvidia-smi (present wherever the NVIDIA container toolkit mounts the driver),
then applies CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES. Each Gpu keeps the token CUDA
understands (an index or a UUID) so the launcher can hand exactly the chosen GPUs to its
child. `assumed` builds an inventory from `--assume-gpus 4x80`, to plan for another machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from recipes.errors import BadInput


@dataclass(frozen=True)
class Gpu:
    id: str  # what CUDA_VISIBLE_DEVICES takes for this GPU: an index or a UUID
    name: str = "GPU"
    memory_gib: float | None = None  # None: unknown (planning then trusts that it fits)


QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(QUERY, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_nvidia_smi(text: str) -> list[tuple[str, str, str, float | None]]:
    """Rows of (index, uuid, name, memory GiB) from the CSV of QUERY."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, uuid, name, memory = parts[0], parts[1], ",".join(parts[2:-1]), parts[-1]
        try:
            gib: float | None = round(float(memory) / 1024, 1)
        except ValueError:
            gib = None
        rows.append((index, uuid, name, gib))
    return rows


def _visible_filter(rows: list[tuple[str, str, str, float | None]], spec: str) -> list[Gpu]:
    """Apply a CUDA_VISIBLE_DEVICES-style list (indices, UUIDs or UUID prefixes)."""
    by_index = {r[0]: r for r in rows}
    chosen: list[Gpu] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.lstrip("-").isdigit() and int(token) < 0:
            break  # CUDA stops at the first invalid ordinal
        row = by_index.get(token) or next((r for r in rows if r[1].startswith(token)), None)
        if row is None:
            break  # likewise for an unknown device
        chosen.append(Gpu(id=token, name=row[2], memory_gib=row[3]))
    return chosen


def discover(environ: Mapping[str, str], smi: Callable[[], str | None] = _nvidia_smi) -> list[Gpu]:
    nvidia_visible = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia_visible is not None and nvidia_visible.strip().lower() in ("none", "void", ""):
        return []
    text = smi()
    if not text:
        return []
    rows = parse_nvidia_smi(text)
    cuda_visible = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible is not None:
        return _visible_filter(rows, cuda_visible)
    return [Gpu(id=index, name=name, memory_gib=gib) for index, _, name, gib in rows]


ASSUME = re.compile(r"^\s*(\d+)\s*(?:x\s*(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?)?\s*$", re.IGNORECASE)


def assumed(spec: str) -> list[Gpu]:
    """'4' or '4x80' (GiB each) -> that many GPUs with ids 0..N-1; '0' plans for a CPU host."""
    match = ASSUME.match(spec)
    if not match:
        raise BadInput(f"--assume-gpus {spec!r} is not N or NxGIB; write it like 4 or 4x80")
    count = int(match.group(1))
    memory = float(match.group(2)) if match.group(2) else None
    if memory is not None and memory <= 0:
        raise BadInput(f"--assume-gpus {spec!r} gives GPUs no memory; write it like 4x80")
    return [Gpu(id=str(i), name="assumed GPU", memory_gib=memory) for i in range(count)]
