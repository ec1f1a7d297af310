"""`doctor --collectives`: do the ranks of a job reach each other, and how fast? Checked in seconds,
before a run spends minutes downloading and loading weights only to hang at its first collective.

    python -m entrypoint doctor --collectives [--timeout SECONDS] [--json]

The ranks are started as a run of `ddp` or `fsdp` starts them, from the same environment (NUM_GPUS,
CPU_PROCESSES, NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT and Kubeflow's variables): accelerate
launch with the generated accelerate config (entrypoint/plan.py), one process per GPU in use (per
CPU process with CPU_PROCESSES, over gloo), the same variables added and removed. Each rank runs
trainer/collectives.py: init_process_group, then a timed all-reduce and all-gather at a few sizes,
each checked for the right values, with nccl-tests' bus bandwidth. On several machines, run it on
every machine at once, as the job would run.

The timeout bounds the whole check: when it passes, the launcher kills every process it started
(a rank stuck in the rendezvous or in a collective included) and explains, from the step each
rank reported last, what that suggests and what to try. Exit 0 when every rank joined and every
collective returned the right values; 1 when not; 2 for bad input, as everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entrypoint import decide, doctor
from entrypoint.environment import Request
from entrypoint.gpus import Gpu
from entrypoint.plan import accelerate_config, child_env
from recipes.errors import BadInput

KIB, MIB = 1024, 1024**2
# nccl-tests-style sizes: small (latency), middle, large (bandwidth). Gloo on the CPU stays smaller.
SIZES = {"nccl": (1 * MIB, 32 * MIB, 256 * MIB), "gloo": (64 * KIB, 1 * MIB, 16 * MIB)}
DEFAULT_TIMEOUT_S = 300.0
STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
NCCL_VARIABLES = re.compile(r"^NCCL_")
FAILED = 1


@dataclass(frozen=True)
class Check:
    """What will be started: the shape of the job and the launch, as a run would have them."""

    backend: str  # nccl, gloo
    gpu_ids: list[str]
    per_node: int
    nnodes: int
    node_rank: int
    master: str | None  # host:port, on several machines
    timeout_s: float
    config: dict[str, Any]
    env: dict[str, str]
    env_unset: list[str]
    sizes: tuple[int, ...] = ()

    @property
    def world_size(self) -> int:
        return self.per_node * self.nnodes

    @property
    def local_ranks(self) -> list[int]:
        """The global ranks of this machine's processes (torchrun's static assignment)."""
        return list(range(self.node_rank * self.per_node, (self.node_rank + 1) * self.per_node))

    def command(self, python: str, folder: Path) -> list[str]:
        sizes = ",".join(str(s) for s in self.sizes)
        program = ["-m", "trainer.collectives", "--report", str(folder), "--sizes", sizes]
        config = str(folder / "accelerate_config.yaml")
        return [python, "-m", "accelerate.commands.launch", "--config_file", config, *program]


def plan(request: Request, gpus: list[Gpu], timeout_s: float) -> Check:
    """The processes a ddp run of this environment would start; BadInput where there is nothing to check."""
    if timeout_s <= 0:
        raise BadInput(f"--timeout {timeout_s:g} must be more than 0 seconds; e.g. --timeout 120")
    decide.refuse_nested_launch(request)
    cluster = request.cluster
    if request.cpu_processes is not None:
        chosen, per_node, backend = [], request.cpu_processes, "gloo"
    elif gpus:
        chosen, _ = decide.gpus_in_use(request, gpus)
        per_node, backend = len(chosen), "nccl"
    else:
        raise BadInput(
            "no GPU is visible, so there is no NCCL to check: give the container GPUs (docker run --gpus all; "
            "Kubernetes: a nvidia.com/gpu limit), or set CPU_PROCESSES=2 to check gloo on the CPU"
        )
    if per_node * cluster.nnodes < 2:
        asked = f"CPU_PROCESSES={per_node}" if backend == "gloo" else f"{len(chosen)} GPU in use"
        raise BadInput(
            f"{asked} on one machine is one process, which has no peer to exchange with; check 2 or more "
            f"(NUM_GPUS=2, CPU_PROCESSES=2, or NNODES)"
        )
    several = cluster.nnodes > 1
    return Check(
        backend=backend,
        gpu_ids=[g.id for g in chosen],
        per_node=per_node,
        nnodes=cluster.nnodes,
        node_rank=cluster.node_rank,
        master=f"{cluster.master_addr}:{cluster.master_port}" if several else None,
        timeout_s=timeout_s,
        config=accelerate_config(per_node * cluster.nnodes, chosen, "no", cluster),
        env=child_env("ddp", chosen, request.pythonpath),
        env_unset=list(request.consumed),
        sizes=SIZES[backend],
    )


# ---- running it, bounded


@dataclass
class Outcome:
    returncode: int | None  # None: still running at the timeout, then killed
    seconds: float
    reports: dict[int, dict[str, Any]]  # global rank -> its last report (this machine's ranks)
    log_tail: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def execute(check: Check, python: str, environ: Mapping[str, str]) -> Outcome:
    """Start the ranks, wait at most the timeout, stop whatever is left; what each rank reported."""
    folder = Path(tempfile.mkdtemp(prefix="collectives-"))
    try:
        (folder / "accelerate_config.yaml").write_text(yaml.safe_dump(check.config, sort_keys=False))
        env = {**environ, **check.env}
        for name in check.env_unset:
            env.pop(name, None)
        started = time.monotonic()
        with (folder / "log").open("w") as log:
            child = subprocess.Popen(
                check.command(python, folder),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            returncode = wait(child, folder, check.timeout_s)
        lines = (folder / "log").read_text(errors="replace").splitlines()
        return Outcome(returncode, round(time.monotonic() - started, 2), read_reports(folder), lines[-20:])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wait(child: subprocess.Popen, folder: Path, timeout_s: float) -> int | None:
    """The child's status, or None after stopping it at the timeout. SIGTERM / SIGINT to the
    launcher stop every process too (Interrupted), so a deleted pod leaves no rank behind."""

    def interrupt(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(child, folder)
        return None
    except Interrupted:
        stop(child, folder)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop(child: subprocess.Popen, folder: Path) -> None:
    """SIGTERM to the launch's process group (torchrun passes it to its ranks), SIGKILL after the
    grace; then SIGKILL to each rank that reported its pid: torchrun starts every rank in a session
    of its own, which a signal to the launch's group does not reach once torchrun is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    for report in read_reports(folder).values():
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(report["pid"], signal.SIGKILL)


def read_reports(folder: Path) -> dict[int, dict[str, Any]]:
    reports = {}
    for path in folder.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
            reports[int(report["rank"])] = report
    return reports


# ---- facts the launcher reads itself (no torch)


def host_facts(environ: Mapping[str, str], check: Check) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "shm_gib": doctor._shm_gib(),
        "nccl_variables": doctor.redacted(environ, NCCL_VARIABLES),
    }
    if check.backend == "nccl" and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
            facts["topology"] = topo.stdout.strip() if topo.returncode == 0 else None
    return facts


# ---- what went wrong, and what to try


@dataclass(frozen=True)
class Problem:
    what: str
    cause: str
    fix: str


def ranks_text(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks) if ranks else "none"


def ranks_named(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) != 1 else ''} {ranks_text(ranks)}"


def phase_of(report: dict[str, Any]) -> str:
    return report.get("failed_in", report["phase"]) if report["phase"] == "failed" else report["phase"]


def joined(report: dict[str, Any]) -> bool:
    return phase_of(report) not in ("started", "rendezvous")


def diagnose(check: Check, outcome: Outcome, facts: dict[str, Any]) -> list[Problem]:
    if outcome.timed_out:
        return [hang(check, outcome, facts)]
    failed = {r: rep for r, rep in outcome.reports.items() if rep["phase"] == "failed"}
    if failed:
        return [failure(check, rank, report) for rank, report in sorted(failed.items())]
    if outcome.returncode != 0:
        return [
            Problem(
                f"the launch exited with status {outcome.returncode} before the ranks reported a result "
                f"(ranks of this machine that reported: {ranks_text(sorted(outcome.reports))})",
                "accelerate launch or torchrun could not start the ranks; its last lines: "
                + " | ".join(outcome.log_tail[-5:]),
                "run it again with NCCL_DEBUG=INFO and TORCH_DISTRIBUTED_DEBUG=DETAIL and read the log",
            )
        ]
    return wrong_values(check, outcome)


def hang(check: Check, outcome: Outcome, facts: dict[str, Any]) -> Problem:
    """Stopped at the timeout: where the ranks of this machine were says which layer hangs."""
    mine = check.local_ranks
    started = [r for r in mine if r in outcome.reports]
    waiting = [r for r in started if not joined(outcome.reports[r])]
    t = f"{check.timeout_s:g} s"
    if not started and check.nnodes > 1:
        return Problem(
            f"no rank of this machine (node {check.node_rank} of {check.nnodes}, {ranks_named(mine)}) started "
            f"within {t}: torchrun starts them only once the launchers of all {check.nnodes} machines have met "
            f"at {check.master}, and they never all did",
            f"another machine of the job did not start the check, or cannot reach {check.master} (a firewall, a "
            f"wrong MASTER_ADDR / MASTER_PORT, a Service or DNS name that does not resolve there), or NNODES "
            f"differs between the machines",
            f"run `doctor --collectives` on all {check.nnodes} machines at once with the same NNODES, MASTER_ADDR "
            f"and MASTER_PORT and NODE_RANK 0..{check.nnodes - 1}; check that each reaches {check.master} "
            f"(e.g. `nc -z` to it); raise --timeout when machines start minutes apart",
        )
    if not started:
        return Problem(
            f"no rank started within {t}",
            "starting the ranks (importing torch, loading CUDA) took longer than the timeout: a slow disk or an "
            "overloaded machine; the launch's last lines: " + " | ".join(outcome.log_tail[-5:]),
            "raise --timeout, and look at what else runs on the machine",
        )
    if waiting or len(started) < len(mine):
        return rendezvous_hang(check, outcome, started, waiting, t)
    return collective_hang(check, outcome, facts, t)


def rendezvous_hang(check: Check, outcome: Outcome, started: list[int], waiting: list[int], t: str) -> Problem:
    missing = [r for r in check.local_ranks if r not in started]
    others = [r for r in range(check.world_size) if r not in check.local_ranks]
    absent = f"; {ranks_named(missing)} of this machine never started" if missing else ""
    elsewhere = f" {ranks_named(others).capitalize()} run on the other machines and must join too." if others else ""
    return Problem(
        f"{ranks_named(waiting)} waited {t} in init_process_group for the other ranks of {check.world_size}"
        f"{absent}.{elsewhere}",
        "a rank that never joined: it died or hangs before init_process_group (out of host memory, a GPU "
        "another process holds), or, across machines, a machine that cannot reach the rendezvous address",
        "run it again with NCCL_DEBUG=INFO; check each machine's `doctor` (GPUs visible, memory) and that every "
        "machine runs the check with the same NNODES, MASTER_ADDR and MASTER_PORT",
    )


def collective_hang(check: Check, outcome: Outcome, facts: dict[str, Any], t: str) -> Problem:
    """Every rank joined, then a collective never returned: a transport that connects but stalls."""
    where = sorted({step_text(phase_of(outcome.reports[r])) for r in check.local_ranks})
    shm = facts.get("shm_gib")
    causes = []
    if check.backend == "nccl" and shm is not None and shm < doctor.SHM_ENOUGH_GIB:
        causes.append(
            f"/dev/shm is {shm} GiB, too small for NCCL's shared-memory transport (docker run "
            f"--ipc=host or --shm-size=16g; Kubernetes: an emptyDir with medium: Memory on /dev/shm)"
        )
    if check.backend == "nccl":
        causes.append(
            "peer-to-peer copies between GPUs that the platform blocks (IOMMU / ACS on PCIe, a VM): "
            "try NCCL_P2P_DISABLE=1; if that helps, fix the platform or keep it"
        )
        causes.append("the shared-memory transport: try NCCL_SHM_DISABLE=1")
    if check.nnodes > 1:
        causes.append(
            "the network between machines: NCCL picked an interface the others cannot reach "
            "(set NCCL_SOCKET_IFNAME to the right one), or InfiniBand / RoCE that does not work "
            "(try NCCL_IB_DISABLE=1)"
        )
    causes = causes or [
        "gloo's TCP connections between the processes stall (a firewall, or an interface the "
        "others cannot reach: set GLOO_SOCKET_IFNAME)"
    ]
    return Problem(
        f"every rank of this machine joined, then stopped in {' / '.join(where)} for {t}",
        "; or ".join(causes),
        "try the variables named above one at a time with this check (they pass to the ranks as they would "
        "to training); NCCL_DEBUG=INFO shows the transport NCCL chose",
    )


# Errors a rank can report, and what they usually mean.
KNOWN_ERRORS = (
    (
        re.compile(r"address already in use", re.I),
        "MASTER_PORT is taken on the main machine by another process (an earlier job still running?)",
        "free the port, or set MASTER_PORT to a free one on every machine",
    ),
    (
        re.compile(r"connection refused|connect\(\)|no route to host|name or service not known|unknown host", re.I),
        "a rank cannot connect to the rendezvous or to its peers (wrong MASTER_ADDR, a firewall, DNS)",
        "check MASTER_ADDR / MASTER_PORT from every machine; set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the "
        "interface the machines share",
    ),
    (
        re.compile(r"out of memory", re.I),
        "a GPU has too little free memory for the check's buffers: another process holds it",
        "look at nvidia-smi for other processes on the GPUs in use",
    ),
    (
        re.compile(r"nccl", re.I),
        "NCCL failed to set up or run a transport",
        "run it again with NCCL_DEBUG=INFO; try NCCL_P2P_DISABLE=1, NCCL_SHM_DISABLE=1, or NCCL_IB_DISABLE=1",
    ),
)


def failure(check: Check, rank: int, report: dict[str, Any]) -> Problem:
    error = report.get("error", "")
    cause, fix = "the error above", "run it again with NCCL_DEBUG=INFO and TORCH_DISTRIBUTED_DEBUG=DETAIL"
    for pattern, known_cause, known_fix in KNOWN_ERRORS:
        if pattern.search(error):
            cause, fix = known_cause, known_fix
            break
    return Problem(f"rank {rank} failed in {step_text(report.get('failed_in', '?'))}: {error}", cause, fix)


def wrong_values(check: Check, outcome: Outcome) -> list[Problem]:
    problems = []
    for result in results_of(check, outcome):
        if not result["correct"]:
            problems.append(
                Problem(
                    f"{result['op']} of {size_text(result['bytes'])} returned wrong values",
                    "data corrupted in transit: a faulty GPU, link or driver, or an NCCL bug",
                    "run it again with NCCL_DEBUG=INFO; try NCCL_PROTO=Simple; check the GPUs (nvidia-smi -q, dmesg)",
                )
            )
    if not results_of(check, outcome):
        problems.append(
            Problem(
                "no rank of this machine reported results",
                "the ranks ended without a report",
                "run it again with NCCL_DEBUG=INFO",
            )
        )
    return problems


def results_of(check: Check, outcome: Outcome) -> list[dict[str, Any]]:
    """The collectives' figures (every rank holds the slowest rank's times): this machine's first rank's."""
    done = [outcome.reports[r] for r in check.local_ranks if r in outcome.reports]
    return done[0]["results"] if done else []


def step_text(phase: str) -> str:
    """A rank's step as the report names it ("all_reduce 1048576"), for people ("all_reduce of 1 MiB")."""
    op, _, size = phase.partition(" ")
    return f"{op} of {size_text(int(size))}" if size.isdigit() else phase


def size_text(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def warnings(check: Check, outcome: Outcome, facts: dict[str, Any]) -> list[str]:
    """What works but costs speed, or may stall a long run."""
    found = []
    for name in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE"):
        if facts["nccl_variables"].get(name, "0") not in ("0", ""):
            found.append(
                f"{name}={facts['nccl_variables'][name]} is set: NCCL avoids that transport, slower than "
                f"it could be; keep it only where it works around a hang"
            )
    shm = facts.get("shm_gib")
    if check.backend == "nccl" and shm is not None and shm < doctor.SHM_ENOUGH_GIB:
        found.append(f"/dev/shm is {shm} GiB: NCCL's shared-memory transport can stall on it; docker run --ipc=host")
    blocked = [pair for pair, ok in peer_access(outcome).items() if not ok]
    if blocked:
        found.append(
            f"no peer access between GPUs {', '.join(blocked)}: NCCL copies through host memory there "
            f"(slower); expected on some PCIe machines and VMs"
        )
    return found


def peer_access(outcome: Outcome) -> dict[str, bool]:
    return next((r["peer_access"] for r in outcome.reports.values() if "peer_access" in r), {})


def as_json(check: Check, outcome: Outcome, facts: dict[str, Any], problems: list[Problem]) -> dict[str, Any]:
    reports = outcome.reports
    return {
        "ok": not problems,
        "backend": check.backend,
        "world_size": check.world_size,
        "nnodes": check.nnodes,
        "node_rank": check.node_rank,
        "processes_per_node": check.per_node,
        "gpu_ids": check.gpu_ids,
        "timeout_s": check.timeout_s,
        "timed_out": outcome.timed_out,
        "seconds": outcome.seconds,
        "ranks": {
            "this_machine": check.local_ranks,
            "reported": sorted(reports),
            "joined": sorted(r for r, rep in reports.items() if joined(rep)),
            "last_step": {str(r): step_text(phase_of(rep)) for r, rep in sorted(reports.items())},
        },
        "results": results_of(check, outcome),
        "facts": facts
        | {
            "peer_access": peer_access(outcome),
            "devices": {str(r): rep.get("device") for r, rep in sorted(reports.items())},
            "nccl": next((r["nccl"] for r in reports.values() if "nccl" in r), None),
        },
        "problems": [p.__dict__ for p in problems],
        "warnings": warnings(check, outcome, facts),
        "log_tail": outcome.log_tail if problems else [],
    }


def render(report: dict[str, Any]) -> str:
    where = f"GPUs {','.join(report['gpu_ids'])}" if report["gpu_ids"] else "the CPU"
    machines = (
        f"{report['nnodes']} machines (this one: node {report['node_rank']})" if report["nnodes"] > 1 else ("1 machine")
    )
    lines = [
        f"collectives  {report['world_size']} ranks, {report['processes_per_node']} per machine on {where} "
        f"({report['backend']}), {machines}; {report['seconds']} s (timeout {report['timeout_s']:g} s)",
        f"{'op':<11} {'size':>8} {'time':>10} {'algbw':>11} {'busbw':>11}  values",
    ]
    if not report["results"]:
        lines[-1] = "no results: the collectives did not complete"
    for r in report["results"]:
        lines.append(
            f"{r['op']:<11} {size_text(r['bytes']):>8} {r['seconds'] * 1e3:>7.3f} ms {r['algbw_gbps']:>6.2f} GB/s "
            f"{r['busbw_gbps']:>6.2f} GB/s  {'right' if r['correct'] else 'WRONG'}"
        )
    ranks = report["ranks"]
    lines.append(
        f"ranks       this machine {ranks_text(ranks['this_machine'])}; reported {ranks_text(ranks['reported'])}"
        f"; joined {ranks_text(ranks['joined'])}"
    )
    facts = report["facts"]
    nccl = " ".join(f"{k}={v}" for k, v in facts["nccl_variables"].items()) or "none set"
    lines.append(f"facts       /dev/shm {facts['shm_gib']} GiB; NCCL variables: {nccl}")
    if facts["peer_access"]:
        lines.append(
            "            peer access "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in facts["peer_access"].items())
        )
    if facts.get("topology"):
        lines += ["topology", *(f"  {line}" for line in facts["topology"].splitlines())]
    lines += [f"warning     {w}" for w in report["warnings"]]
    for problem in report["problems"]:
        lines += [f"FAILED: {problem['what']}", f"  likely cause: {problem['cause']}", f"  try: {problem['fix']}"]
    if report["problems"] and report["log_tail"]:
        lines += ["the launch's last lines:", *(f"  {line}" for line in report["log_tail"])]
    if not report["problems"]:
        lines.append("ok: every rank joined, and every collective returned the right values")
    return "\n".join(lines)


def main(
    environ: Mapping[str, str], request: Request, gpus: list[Gpu], python: str, timeout_s: float, json_output: bool
) -> int:
    """`doctor --collectives`: plan (BadInput before anything starts), run bounded, explain."""
    check = plan(request, gpus, timeout_s)
    where = f"GPUs {','.join(check.gpu_ids)}" if check.gpu_ids else "the CPU"
    print(
        f"checking collectives: {check.world_size} ranks ({check.backend}, {where}), timeout {timeout_s:g} s ...",
        file=sys.stderr,
        flush=True,
    )
    facts = host_facts(environ, check)
    try:
        outcome = execute(check, python, environ)
    except Interrupted as stopped:
        return 128 + stopped.signum
    report = as_json(check, outcome, facts, diagnose(check, outcome, facts))
    print(json.dumps(report, indent=2) if json_output else render(report), flush=True)
    return 0 if report["ok"] else FAILED
