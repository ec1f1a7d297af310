"""The rank program of `doctor --collectives`: a timed all-reduce and all-gather over every rank,
started exactly as training is (accelerate launch with the generated config), so it travels the
same path: the rendezvous at MASTER_ADDR:MASTER_PORT, NCCL between GPUs (gloo on the CPU).

    accelerate launch --config_file ... -m trainer.collectives --report DIR --sizes 1048576,...

Each rank writes DIR/rank-<RANK>.json whole (recipes/atomic.py) before every step it takes: the
launcher (entrypoint/collectives.py) reads where each rank got to, so a rank that hangs, in the
rendezvous or in a collective, is still named with the step it hangs in after the launcher has
killed it. Sizes are nccl-tests': the bytes each rank's all-reduce buffer holds, and the bytes
all-gather's output holds (each rank gives 1/n of it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from recipes import atomic

WARMUP = 1
ITERATIONS = 5


class Reporter:
    """This rank's report: what it is, the step it is in, what it measured."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = folder / f"rank-{rank}.json"
        self.data: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "results": []}

    def step(self, phase: str, **facts: Any) -> None:
        self.data.update(facts, phase=phase, at=time.time())
        atomic.write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def device_facts(cuda: bool, local_rank: int) -> dict[str, Any]:
    """The GPU this rank drives and, from local rank 0, which GPU pairs reach each other directly
    (peer access: NCCL's P2P transport; without it traffic goes through host memory)."""
    if not cuda:
        return {"device": "cpu"}
    torch.cuda.set_device(local_rank)
    facts: dict[str, Any] = {"device": f"cuda:{local_rank} {torch.cuda.get_device_name(local_rank)}"}
    facts["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    if local_rank == 0:
        count = torch.cuda.device_count()
        facts["peer_access"] = {
            f"{a}->{b}": torch.cuda.can_device_access_peer(a, b) for a in range(count) for b in range(count) if a != b
        }
    return facts


def timed(run, device: torch.device) -> float:
    """Seconds per call of `run`, after WARMUP calls, averaged over ITERATIONS."""
    for _ in range(WARMUP):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(ITERATIONS):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / ITERATIONS


def all_reduce(size: int, rank: int, world: int, device: torch.device) -> tuple[float, bool, int]:
    """(seconds, right values, bytes): every rank gives rank+1, so every element sums to n(n+1)/2."""
    values = torch.full((size // 4,), float(rank + 1), device=device)
    seconds = timed(lambda: dist.all_reduce(values), device)
    check = torch.full((size // 4,), float(rank + 1), device=device)
    dist.all_reduce(check)
    return seconds, bool((check == world * (world + 1) / 2).all()), check.numel() * 4


# torch 2.13 renamed all_gather_into_tensor (the image's torch 2.11 has only the old name).
GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(size: int, rank: int, world: int, device: torch.device) -> tuple[float, bool, int]:
    """(seconds, right values, bytes gathered): rank r's share holds r+1, so share r of the output
    must too."""
    share = size // 4 // world
    mine = torch.full((share,), float(rank + 1), device=device)
    out = torch.empty(share * world, device=device)
    seconds = timed(lambda: GATHER(out, mine), device)
    expected = torch.arange(1, world + 1, device=device, dtype=out.dtype).repeat_interleave(share)
    return seconds, bool((out == expected).all()), out.numel() * 4


# nccl-tests' bus bandwidth: what each link carries, comparable across rank counts.
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n}
OPS = {"all_reduce": all_reduce, "all_gather": all_gather}


def measure(report: Reporter, sizes: list[int], rank: int, world: int, device: torch.device) -> None:
    for op, run in OPS.items():
        for size in sizes:
            report.step(f"{op} {size}")
            seconds, right, moved = run(size, rank, world, device)
            # The slowest rank's time is the collective's, and the values are right only if every
            # rank got them right: every rank takes the maximum time and the minimum verdict.
            slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            every = torch.tensor([int(right)], dtype=torch.int32, device=device)
            dist.all_reduce(every, op=dist.ReduceOp.MIN)
            seconds, right = float(slowest.item()), bool(every.item())
            algbw = moved / seconds / 1e9
            report.data["results"].append(
                {
                    "op": op,
                    "bytes": moved,
                    "seconds": seconds,
                    "algbw_gbps": round(algbw, 4),
                    "busbw_gbps": round(algbw * BUS_FACTOR[op](world), 4),
                    "correct": right,
                }
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.collectives", description=__doc__)
    parser.add_argument("--report", required=True, type=Path, help="the folder each rank writes rank-N.json to")
    parser.add_argument("--sizes", required=True, help="comma-separated byte counts")
    args = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    report = Reporter(args.report, rank)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    report.step("started", local_rank=local_rank, world_size=world, backend=backend, torch=torch.__version__)
    try:
        report.step("started", **device_facts(cuda, local_rank))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        report.step("rendezvous")
        dist.init_process_group(backend, device_id=device if cuda else None)
        report.step("joined")
        dist.barrier()
        measure(report, [int(s) for s in args.sizes.split(",")], rank, world, device)
        report.step("done")
        dist.destroy_process_group()
    except Exception as exc:  # reported whole, for the launcher to explain; the status says it failed
        last = traceback.format_exception_only(exc)[-1].strip()
        report.step("failed", failed_in=report.data["phase"], error=last[-2000:])
        print(f"rank {rank}: {last}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
