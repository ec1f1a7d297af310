"""Several machines: our variables, Kubeflow Trainer v2 (PET_*), Kubeflow PyTorchJob
(WORLD_SIZE / RANK), their precedence, their bad values, and a real two-node run on one host."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import ROOT, clean_env, plan_for

from entrypoint import environment, gpus, plan
from recipes import catalog
from recipes.errors import BadInput

SMOKE = catalog.load("smoke")
FOUR = gpus.assumed("4x80")


def make(env: dict[str, str], inventory=FOUR, loaded=SMOKE) -> plan.Plan:
    return plan_for(env, loaded, inventory)


def test_our_variables_make_one_machine_of_a_multi_node_ddp_job():
    p = make({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"})
    assert (p.mode, p.num_processes, p.num_machines, p.machine_rank) == ("ddp", 8, 2, 1)
    config = p.accelerate_config
    assert (config["num_machines"], config["machine_rank"], config["num_processes"]) == (2, 1, 8)
    assert (config["main_process_ip"], config["main_process_port"], config["rdzv_backend"]) == (
        "10.0.0.1",
        29555,
        "static",
    )
    assert "/work/outputs/smoke/launch/node-1/accelerate_config.yaml" in p.files


def test_kubeflow_trainjob_variables_are_read():
    env = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "0",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29500",
        "PET_NPROC_PER_NODE": "auto",
    }
    p = make(env)
    assert (p.num_processes, p.num_machines, p.machine_rank) == (8, 2, 0)
    assert p.accelerate_config["main_process_ip"] == "job-node-0-0.job"
    assert "Kubeflow Trainer" in environment.read(env).cluster.source


def test_pet_nproc_per_node_limits_the_gpus_per_machine():
    p = make({"PET_NNODES": "2", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "2"})
    assert (p.gpu_ids, p.num_processes) == (["0", "1"], 4)


def test_kubeflow_pytorchjob_world_size_and_pod_rank_are_read_as_nodes():
    # training-operator v1: WORLD_SIZE = replicas x nprocPerNode, RANK = the pod's index.
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "8",
        "RANK": "1",
        "PET_NPROC_PER_NODE": "4",
    }
    p = make(env)
    assert (p.num_machines, p.machine_rank, p.num_processes) == (2, 1, 8)
    assert p.accelerate_config["main_process_port"] == 23456
    assert {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"} <= set(p.env_unset)


def test_elastic_rendezvous_endpoint_uses_c10d():
    env = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "PET_RDZV_ENDPOINT": "job-master-0:29400",
        "PET_RDZV_BACKEND": "c10d",
    }
    config = make(env).accelerate_config
    assert (config["rdzv_backend"], config["main_process_ip"], config["main_process_port"]) == (
        "c10d",
        "job-master-0",
        29400,
    )


def test_our_variables_take_precedence_over_the_clusters():
    env = {
        "NNODES": "3",
        "PET_NNODES": "2",
        "NODE_RANK": "2",
        "PET_NODE_RANK": "0",
        "MASTER_ADDR": "ours",
        "PET_MASTER_ADDR": "theirs",
        "NUM_GPUS": "1",
        "PET_NPROC_PER_NODE": "4",
    }
    p = make(env)
    assert (p.num_machines, p.machine_rank, p.num_processes) == (3, 2, 3)
    assert p.accelerate_config["main_process_ip"] == "ours"


def test_multi_node_accelerate_config_loads_in_accelerate(tmp_path):
    p = make({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})
    path = tmp_path / "config.yaml"
    path.write_text(next(text for name, text in p.files.items() if name.endswith("accelerate_config.yaml")))
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.machine_rank, config.num_processes) == (2, 1, 8)
    assert (config.main_process_ip, config.main_process_port) == ("10.0.0.1", 29500)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2"}, "2 machines .* but MASTER_ADDR is not set"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "m"}, r"NODE_RANK=2 is outside 0..1"),
        ({"NNODES": "2", "NODE_RANK": "-1", "MASTER_ADDR": "m"}, "NODE_RANK='-1' must be at least 0"),
        ({"NNODES": "0"}, "NNODES='0' must be at least 1"),
        ({"NNODES": "two"}, "NNODES='two' is not a whole number"),
        ({"NNODES": "2", "MASTER_ADDR": "m", "MASTER_PORT": "70000"}, "MASTER_PORT='70000' is not a port"),
        ({"NNODES": "2", "MASTER_ADDR": "m", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a whole number"),
        ({"PET_NNODES": "2", "PET_RDZV_ENDPOINT": "nohost"}, "PET_RDZV_ENDPOINT='nohost' is not HOST:PORT"),
        ({"PET_NPROC_PER_NODE": "cpu"}, "PET_NPROC_PER_NODE='cpu' is not a whole number"),
        (
            {"NNODES": "2", "MASTER_ADDR": "m", "PARALLELISM": "model"},
            "PARALLELISM=model runs ONE process on ONE machine",
        ),
        ({"NNODES": "2", "MASTER_ADDR": "m", "PARALLELISM": "single"}, "PARALLELISM=single runs ONE process"),
        (
            {"PET_NNODES": "2", "PET_MASTER_ADDR": "m", "PET_NPROC_PER_NODE": "8"},
            r"PET_NPROC_PER_NODE=8 but only 4 GPU\(s\)",
        ),
    ],
)
def test_bad_multi_node_settings_are_refused_with_the_value_and_the_fix(env, message):
    with pytest.raises(BadInput, match=message):
        make(env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_nodes_on_one_host_train_together_and_end_with_identical_weights(tmp_path, parallelism):
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        env = clean_env(
            NNODES="2",
            NODE_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            CPU_PROCESSES="1",
            PARALLELISM=parallelism,
            OUTPUTS_DIR=str(tmp_path / "shared"),
            PYTHONPATH=str(ROOT),
        )
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        # Each node logs to a file: a pipe nobody reads while waiting on the other node can fill up.
        log = (tmp_path / f"node{rank}.log").open("w")
        command = [sys.executable, "-m", "entrypoint", "run", "smoke", "training.max_steps=20"]
        nodes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    statuses = [node.wait(timeout=600) for node in nodes]
    logs = [(tmp_path / f"node{rank}.log").read_text()[-2000:] for rank in (0, 1)]
    assert statuses == [0, 0], logs
    out = Path(tmp_path / "shared" / "smoke")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["mode"] == parallelism
    if parallelism == "ddp":  # each node holds the whole model, and the two agree
        first, second = metrics["trainable_fingerprints"]
        assert first == second
    else:  # one model, sharded across the two nodes
        held = metrics["trainable_elements_per_rank"]
        assert len(metrics["trainable_fingerprints"]) == 1 and held[0] == held[1] > 0
    assert metrics["final_loss"] < metrics["first_loss"]
    assert sorted(p.name for p in (out / "launch").iterdir()) == ["node-0", "node-1"]
    assert list(out.rglob("adapter_model.safetensors")) == [out / "adapter" / "adapter_model.safetensors"]
