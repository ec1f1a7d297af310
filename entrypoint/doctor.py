"""`doctor`: what this machine offers for training, and the known stalls with their fixes.

Reads without importing torch: nvidia-smi, package metadata, /dev/shm, resource limits and
NCCL variables. Values of variables named like secrets are never printed.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata

from entrypoint import gpus

PACKAGES = ("torch", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
SHOWN_VARIABLES = re.compile(r"^(NCCL_|CUDA_|NVIDIA_|TORCH_|UNSLOTH_|PARALLELISM$|NUM_GPUS$|HF_HUB_OFFLINE$|HF_HOME$)")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE|CREDENTIAL", re.IGNORECASE)
GIB = 1024**3
SHM_ENOUGH_GIB = 1.0
STACK_ENOUGH = 67108864


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redacted(environ: Mapping[str, str], names: re.Pattern[str] = SHOWN_VARIABLES) -> dict[str, str]:
    """The variables worth showing; a secret's value becomes '(set, hidden)'."""
    return {
        k: "(set, hidden)" if is_secret(k) else v for k, v in sorted(environ.items()) if names.match(k) or is_secret(k)
    }


@dataclass
class Facts:
    gpus: list[dict]
    driver: str | None
    cuda: str | None
    packages: dict[str, str | None]
    shm_gib: float | None
    memlock: int | None  # bytes; None = unlimited
    stack: int | None
    variables: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def _driver_and_cuda() -> tuple[str | None, str | None]:
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return (driver.group(1) if driver else None, cuda.group(1) if cuda else None)


def _limit(kind: int) -> int | None:
    soft, _ = resource.getrlimit(kind)
    return None if soft == resource.RLIM_INFINITY else soft


def _shm_gib(path: str = "/dev/shm") -> float | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return round(stats.f_blocks * stats.f_frsize / GIB, 2)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect(environ: Mapping[str, str]) -> Facts:
    driver, cuda = _driver_and_cuda()
    facts = Facts(
        gpus=[asdict(g) for g in gpus.discover(environ)],
        driver=driver,
        cuda=cuda,
        packages={name: _version(name) for name in PACKAGES},
        shm_gib=_shm_gib(),
        memlock=_limit(resource.RLIMIT_MEMLOCK),
        stack=_limit(resource.RLIMIT_STACK),
        variables=redacted(environ),
    )
    facts.warnings = warnings(facts)
    return facts


def warnings(facts: Facts) -> list[str]:
    """The known stalls and missing pieces, each with the flag that fixes it."""
    found = []
    if not facts.gpus:
        found.append(
            "no GPU is visible: docker run --gpus all (compose: deploy.resources.reservations.devices; "
            "Kubernetes: resources.limits nvidia.com/gpu)"
        )
    if facts.shm_gib is not None and facts.shm_gib < SHM_ENOUGH_GIB:
        found.append(
            f"/dev/shm is {facts.shm_gib} GiB: NCCL and DataLoader workers stall or crash on it; "
            f"docker run --ipc=host (or --shm-size=16g); Kubernetes: an emptyDir with medium: Memory on /dev/shm"
        )
    if facts.memlock is not None and len(facts.gpus) > 1:
        found.append(
            f"locked memory is limited to {facts.memlock // 1024} KiB: multi-GPU runs can hang; "
            f"docker run --ulimit memlock=-1"
        )
    if facts.stack is not None and facts.stack < STACK_ENOUGH:
        found.append(f"the stack limit is {facts.stack // 1024} KiB; docker run --ulimit stack=67108864")
    missing = [
        name for name in ("torch", "unsloth", "transformers", "trl", "accelerate") if facts.packages[name] is None
    ]
    if missing:
        found.append(f"not installed: {', '.join(missing)}; use the image, or `make smoke` on a checkout")
    return found


def render(facts: Facts) -> str:
    lines = ["GPUs"]
    lines += [f"  {g['id']}: {g['name']}, {g['memory_gib']} GiB" for g in facts.gpus] or ["  none visible"]
    lines.append(f"  driver {facts.driver or '-'}, CUDA {facts.cuda or '-'}")
    lines.append("packages")
    lines += [f"  {name} {version or 'not installed'}" for name, version in facts.packages.items()]
    lines.append("system")
    lines.append(f"  /dev/shm {facts.shm_gib if facts.shm_gib is not None else '?'} GiB")
    lines.append(f"  memlock {'unlimited' if facts.memlock is None else f'{facts.memlock // 1024} KiB'}")
    lines.append(f"  stack {'unlimited' if facts.stack is None else f'{facts.stack // 1024} KiB'}")
    lines.append("variables")
    lines += [f"  {k}={v}" for k, v in facts.variables.items()] or ["  (none of NCCL_*, CUDA_*, ... set)"]
    lines.append("warnings" if facts.warnings else "no warnings")
    lines += [f"  - {w}" for w in facts.warnings]
    return "\n".join(lines)
