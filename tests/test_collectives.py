"""`doctor --collectives`: the ranks a run would start, started the same way, timing all-reduce and
all-gather between them; a rank or a machine that never joins ends the check at its timeout with
an explanation; bad input is refused before anything starts."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, clean_env, plan_for, processes_with, run_cli

from entrypoint import collectives, environment, gpus
from recipes import catalog

TWO_GPUS = gpus.assumed("2x80")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- for real, over gloo on the CPU


@pytest.mark.e2e
def test_two_cpu_processes_pass_over_gloo_and_print_the_bandwidth_of_every_size(tmp_path):
    done = run_cli("doctor", "--collectives", "--timeout", "120", cwd=tmp_path, env=clean_env(CPU_PROCESSES="2"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 ranks, 2 per machine on the CPU (gloo)" in done.stdout
    for op in ("all_reduce", "all_gather"):
        for size in ("64 KiB", "1 MiB", "16 MiB"):
            row = rf"^{op}\s+{size}\s+[\d.]+ ms\s+[\d.]+ GB/s\s+[\d.]+ GB/s\s+right$"
            assert re.search(row, done.stdout, re.M), f"{op} {size}:\n{done.stdout}"
    assert "ok: every rank joined, and every collective returned the right values" in done.stdout


@pytest.mark.e2e
def test_json_gives_each_collectives_bus_bandwidth_by_nccl_tests_formulas(tmp_path):
    done = run_cli("doctor", "--collectives", "--json", cwd=tmp_path, env=clean_env(CPU_PROCESSES="2"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    shape = (report["ok"], report["backend"], report["world_size"], report["ranks"]["joined"])
    assert shape == (True, "gloo", 2, [0, 1])
    factor = {"all_reduce": 2 * (2 - 1) / 2, "all_gather": (2 - 1) / 2}
    assert sorted({(r["op"], r["bytes"]) for r in report["results"]}) == sorted(
        (op, size) for op in factor for size in collectives.SIZES["gloo"]
    )
    for r in report["results"]:
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9, abs=1e-4)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * factor[r["op"]], abs=1e-4)


@pytest.mark.e2e
def test_two_machines_of_one_job_check_together_and_each_prints_the_jobs_figures(tmp_path):
    """NNODES=2 on one host, each machine's launcher started as the job would start it."""
    job = {"CPU_PROCESSES": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "entrypoint", "doctor", "--collectives", "--json", "--timeout", "120"]
    machines = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(PYTHONPATH=str(ROOT), NODE_RANK=str(rank), **job),
        )
        for rank in (0, 1)
    ]
    reports = []
    for machine in machines:
        out, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, out + err
        reports.append(json.loads(out))
    assert [r["ranks"]["joined"] for r in reports] == [[0], [1]]
    assert reports[0]["results"] == reports[1]["results"] != [], "every rank holds the slowest rank's figures"


@pytest.mark.e2e
def test_a_machine_that_never_joins_ends_the_check_at_its_timeout_with_the_explanation(tmp_path):
    """NNODES=2 with only node 0 started: node 1 never joins, so torchrun never starts the ranks."""
    marker = f"collectives-test-{tmp_path.name}"
    cluster = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env = clean_env(CPU_PROCESSES="1", COLLECTIVES_TEST_MARKER=marker, **cluster)
    started = time.monotonic()
    done = run_cli("doctor", "--collectives", "--timeout", "10", cwd=tmp_path, env=env)
    took = time.monotonic() - started
    assert done.returncode == collectives.FAILED, done.stdout + done.stderr
    assert took < 10 + collectives.STOP_GRACE_S + 20, f"{took:.0f} s"
    assert "FAILED: no rank of this machine (node 0 of 2, rank 0) started within 10 s" in done.stdout
    assert "run `doctor --collectives` on all 2 machines at once" in done.stdout
    assert processes_with(marker) == [], "every process the check started is gone"


# ---- refused before anything starts


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"NUM_GPUS": "0"}, [], "NUM_GPUS='0' must be at least 1"),
        ({"CPU_PROCESSES": "1"}, [], "CPU_PROCESSES=1 on one machine is one process, which has no peer"),
        ({"CPU_PROCESSES": "2"}, ["--timeout", "0"], "--timeout 0 must be more than 0 seconds"),
        ({"CPU_PROCESSES": "2", "LOCAL_RANK": "0"}, [], "the launcher is running inside another launcher"),
        ({"CUDA_VISIBLE_DEVICES": ""}, [], "no GPU is visible, so there is no NCCL to check"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2_before_anything_starts(tmp_path, env, args, message):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = run_cli("doctor", "--collectives", *args, cwd=tmp_path, env=clean_env(TMPDIR=str(scratch), **env))
    assert done.returncode == 2, done.stdout + done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert message in error and "Traceback" not in done.stderr
    assert list(scratch.iterdir()) == [], "nothing is written"


def test_timeout_without_collectives_is_refused_naming_the_flag(tmp_path):
    done = run_cli("doctor", "--timeout", "5", cwd=tmp_path)
    assert done.returncode == 2 and "error: --timeout 5 applies to doctor --collectives" in done.stderr


# ---- the same launch as a run, and the explanations


def test_the_ranks_start_with_the_accelerate_config_and_variables_a_ddp_run_of_the_same_environment_gets():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555", "NUM_GPUS": "4"}
    run = plan_for(env, catalog.load("smoke"), gpus.assumed("8x80"))
    check = collectives.plan(environment.read(env), gpus.assumed("8x80"), 60)
    assert run.mode == "ddp" and run.mixed_precision == "no"
    assert (check.config, check.env, check.env_unset) == (run.accelerate_config, run.env, run.env_unset)
    shape = (check.backend, check.world_size, check.local_ranks, check.master)
    assert shape == ("nccl", 8, [4, 5, 6, 7], "10.0.0.1:29555")


def gpu_check() -> collectives.Check:
    return collectives.plan(environment.read({}), TWO_GPUS, 60)


def reports(**phases: str) -> dict[int, dict]:
    return {int(r[1:]): {"rank": int(r[1:]), "pid": 0, "phase": p, "results": []} for r, p in phases.items()}


FACTS = {"shm_gib": 64.0, "nccl_variables": {}}


def test_ranks_that_joined_then_stalled_in_a_collective_point_at_nccls_transports():
    outcome = collectives.Outcome(None, 61.0, reports(r0="all_reduce 268435456", r1="all_reduce 268435456"))
    (problem,) = collectives.diagnose(gpu_check(), outcome, FACTS | {"shm_gib": 0.06})
    assert "every rank of this machine joined, then stopped in all_reduce of 256 MiB for 60 s" in problem.what
    assert problem.cause.startswith("/dev/shm is 0.06 GiB") and "NCCL_P2P_DISABLE=1" in problem.cause


def test_a_rank_missing_from_the_rendezvous_is_named_with_the_ranks_that_waited():
    outcome = collectives.Outcome(None, 61.0, reports(r0="rendezvous"))
    (problem,) = collectives.diagnose(gpu_check(), outcome, FACTS)
    assert "rank 0 waited 60 s in init_process_group for the other ranks of 2" in problem.what
    assert "rank 1 of this machine never started" in problem.what


def test_a_rank_that_cannot_listen_on_master_port_is_told_to_free_or_change_it():
    failed = reports(r0="failed", r1="rendezvous")
    failed[0] |= {"failed_in": "rendezvous", "error": "DistNetworkError: EADDRINUSE: address already in use"}
    (problem,) = collectives.diagnose(gpu_check(), collectives.Outcome(1, 3.0, failed), FACTS)
    assert problem.what.startswith("rank 0 failed in rendezvous: DistNetworkError")
    assert "MASTER_PORT" in problem.cause and "set MASTER_PORT to a free one" in problem.fix


def test_a_collective_that_returns_wrong_values_fails_the_check():
    done = reports(r0="done", r1="done")
    result = {"op": "all_gather", "bytes": 32 * 1024**2, "seconds": 0.01, "algbw_gbps": 3.3, "busbw_gbps": 1.7}
    for report in done.values():
        report["results"] = [result | {"correct": False}]
    outcome = collectives.Outcome(0, 3.0, done)
    problems = collectives.diagnose(gpu_check(), outcome, FACTS)
    assert [p.what for p in problems] == ["all_gather of 32 MiB returned wrong values"]
    assert collectives.as_json(gpu_check(), outcome, FACTS, problems)["ok"] is False
