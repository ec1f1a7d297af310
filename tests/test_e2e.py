"""End to end on the CPU: the launcher really trains the smoke recipe through Unsloth's CPU
backend, in one process, as a real two-process DDP run (gloo, through the generated
accelerate config and `accelerate launch`), and as a two-process run that Unsloth's native
FSDP2 shards (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_cli, run_training_program

pytestmark = pytest.mark.e2e


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_smoke_trains_in_one_process_and_its_loss_falls(tmp_path):
    done = run_cli("run", "smoke", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "smoke"
    m = metrics(out)
    assert (m["mode"], m["world_size"], m["device"], m["steps"]) == ("single", 1, "cpu", 60)
    assert m["final_loss"] < 0.5 * m["first_loss"], m["losses"]
    # The held-out chats are evaluated before the first step, every 20 steps, and their loss falls.
    assert [step for step, _ in m["eval_losses"]] == [0, 20, 40, 60]
    assert m["eval_loss"] == m["eval_losses"][-1][1] < m["eval_losses"][0][1]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "launch" / "recipe.yaml").is_file() and (out / "launch" / "plan.json").is_file()
    assert m["tokens_per_second"] > 0 and m["time_to_first_step_s"] > 0
    assert any((out / "tensorboard").iterdir()), "TensorBoard logs are written in the output folder"
    assert "done: smoke [single x1] 60 steps" in done.stdout


def two_process_run(folder: Path, parallelism: str) -> Path:
    env = clean_env(CPU_PROCESSES="2", PARALLELISM=parallelism)
    done = run_cli("run", "smoke", "training.max_steps=20", cwd=folder, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: smoke [{parallelism} x2] 20 steps" in done.stdout
    return folder / "outputs" / "smoke"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    return two_process_run(tmp_path_factory.mktemp("ddp"), "ddp")


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_smoke_as_two_process_ddp_keeps_ranks_identical_and_writes_one_adapter(ddp_run):
    out = ddp_run
    m = metrics(out)
    assert (m["mode"], m["world_size"]) == ("ddp", 2)
    fingerprints = m["trainable_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert len(m["peak_memory_gib"]) == 2
    adapters = list(out.rglob("adapter_model.safetensors"))
    assert adapters == [out / "adapter" / "adapter_model.safetensors"]
    assert (out / "launch" / "accelerate_config.yaml").is_file()
    assert m["final_loss"] < m["first_loss"]
    # Each rank evaluates its share of the held-out rows; the loss is their mean, and it falls.
    assert [step for step, _ in m["eval_losses"]] == [0, 20] and m["eval_losses"][1][1] < m["eval_losses"][0][1]
    everything = m["trainable_elements_per_rank"]
    assert everything[0] == everything[1] > 0, "every DDP rank holds every trainable weight"


def test_fsdp_shards_the_trainable_weights_over_two_processes_and_trains_the_same_model_as_ddp(tmp_path, ddp_run):
    out = two_process_run(tmp_path, "fsdp")
    m, ddp = metrics(out), metrics(ddp_run)
    assert (m["mode"], m["world_size"]) == ("fsdp", 2)
    # Each rank holds half of what a DDP rank holds: the model really is sharded.
    assert sum(m["trainable_elements_per_rank"]) == ddp["trainable_elements_per_rank"][0]
    assert max(m["trainable_elements_per_rank"]) < ddp["trainable_elements_per_rank"][0]
    # Same data, seed and global batch: the same losses and the same adapter, up to summation order.
    assert [s for s, _ in m["losses"]] == [s for s, _ in ddp["losses"]]
    for (_, loss), (_, expected) in zip(
        m["losses"] + m["eval_losses"], ddp["losses"] + ddp["eval_losses"], strict=True
    ):
        assert loss == pytest.approx(expected, rel=1e-4)
    sharded, replicated = adapter_tensors(out), adapter_tensors(ddp_run)
    assert sorted(sharded) == sorted(replicated)
    for name, tensor in sharded.items():
        assert tensor.shape == replicated[name].shape, name  # rank 0 wrote whole tensors, not its shard
        assert (tensor - replicated[name]).abs().max().item() < 1e-5, name
    assert len(m["trainable_fingerprints"]) == 1, "one copy of the model, hashed once"
    plan = json.loads((out / "launch" / "plan.json").read_text())
    assert plan["env"]["UNSLOTH_FSDP2"] == "1" and plan["accelerate_config"]["distributed_type"] == "MULTI_GPU"


def test_fsdp_full_fine_tuning_holds_half_the_model_per_rank_and_saves_it_whole(tmp_path):
    env = clean_env(CPU_PROCESSES="2", PARALLELISM="fsdp")
    overrides = ["training.max_steps=10", "model.full_finetuning=true", "lora=null", "training.learning_rate=1e-3"]
    done = run_cli("run", "smoke", *overrides, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "smoke"
    m = metrics(out)
    from safetensors.torch import load_file

    saved = load_file(out / "model" / "model.safetensors")
    (base_file,) = (out / "random-model").glob("*/model.safetensors")
    base = load_file(base_file)
    assert sorted(saved) == sorted(base) and all(saved[k].shape == base[k].shape for k in base)
    held = m["trainable_elements_per_rank"]
    assert held[0] == held[1] and sum(held) == sum(t.numel() for t in base.values()), "each rank holds half"
    assert any(not saved[k].equal(base[k]) for k in base) and m["final_loss"] < m["first_loss"]


def test_fsdp_trains_dpo_and_saves_the_trained_adapter_whole(tmp_path):
    recipe = ROOT / "tests" / "recipes" / "tiny-dpo.yaml"
    env = clean_env(CPU_PROCESSES="2", PARALLELISM="fsdp")
    done = run_cli("run", str(recipe), "training.max_steps=10", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "tiny-dpo"
    assert metrics(out)["mode"] == "fsdp"
    tensors = adapter_tensors(out)
    rank = 16  # the recipe's lora.r: a shard would have half of it
    assert all(t.shape[0] == rank for name, t in tensors.items() if "lora_A" in name)
    assert all(t.shape[1] == rank for name, t in tensors.items() if "lora_B" in name)
    assert any("lora_A" in name for name in tensors)
    assert not (out / "adapter" / "ref").exists()


def test_training_program_refuses_model_mode_under_a_multi_process_launch(tmp_path):
    done = run_training_program(tmp_path, "model", WORLD_SIZE="2", LOCAL_RANK="0")
    assert done.returncode == 2
    assert "device_map='auto' in any distributed mode" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
