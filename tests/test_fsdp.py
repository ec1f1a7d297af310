"""PARALLELISM=fsdp: Unsloth's native FSDP2 under `accelerate launch`. Planning (no torch), the
training program's own refusal, and the per-GPU memory of a sharded model. The real sharded run
on the CPU is in test_e2e.py (and SIGTERM under fsdp in test_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from conftest import clean_env, plan_for, run_cli, run_training_program, write_recipe

from entrypoint import gpus, memory, plan
from recipes import catalog
from recipes.errors import BadInput

SMOKE = catalog.load("smoke")

FULL_8B = """
model:
  name: meta-llama/Llama-3.1-8B
  load_in: 16bit
  full_finetuning: true
  max_seq_length: 2048
lora: null
data:
  source: someorg/some-chats
  format: messages
training:
  per_device_batch_size: 1
  optimizer: adamw_torch
"""


def make(env: dict[str, str], inventory: list[gpus.Gpu], loaded=SMOKE) -> plan.Plan:
    return plan_for(env, loaded, inventory)


@pytest.fixture
def full_8b(tmp_path: Path):
    return catalog.load(str(write_recipe(tmp_path, "full-8b", FULL_8B)))


def test_fsdp_runs_one_process_per_gpu_under_accelerate_with_unsloths_fsdp2_switched_on():
    p = make({"PARALLELISM": "fsdp"}, gpus.assumed("4x80"))
    assert (p.mode, p.num_processes, p.gpu_ids) == ("fsdp", 4, ["0", "1", "2", "3"])
    assert p.command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert p.command[p.command.index("--mode") + 1] == "fsdp"
    assert p.env["UNSLOTH_FSDP2"] == "1" and p.env["UNSLOTH_FSDP2_BACKEND"] == "native"
    assert p.device_map == {"": "LOCAL_RANK"}  # each rank loads its copy; FSDP2 shards it in the trainer
    assert "CUDA_VISIBLE_DEVICES" not in p.env  # accelerate sets it from gpu_ids


def test_fsdp_accelerate_config_is_a_plain_multi_process_one_that_accelerate_loads(tmp_path):
    # Unsloth shards natively; an accelerate FSDP config would wrap the sharded model again.
    p = make({"PARALLELISM": "fsdp", "NUM_GPUS": "2"}, gpus.assumed("4x80"))
    path = tmp_path / "accelerate_config.yaml"
    path.write_text(next(text for name, text in p.files.items() if name.endswith("accelerate_config.yaml")))
    loaded = load_config_from_file(str(path))
    assert (str(loaded.distributed_type), loaded.num_processes) == ("DistributedType.MULTI_GPU", 2)


@pytest.mark.parametrize("alias", ["fsdp", "FSDP2", "sharded", " fsdp "])
def test_fsdp_aliases(alias):
    assert make({"PARALLELISM": alias}, gpus.assumed("2x80")).mode == "fsdp"


def test_fsdp_spans_machines():
    env = {"PARALLELISM": "fsdp", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    p = make(env, gpus.assumed("4x80"))
    assert (p.mode, p.num_processes, p.num_machines, p.machine_rank) == ("fsdp", 8, 2, 1)
    assert p.accelerate_config["num_processes"] == 8 and p.accelerate_config["main_process_ip"] == "10.0.0.1"


def test_fsdp_on_the_cpu_shards_over_gloo_processes():
    p = make({"PARALLELISM": "fsdp", "CPU_PROCESSES": "2"}, [])
    assert (p.mode, p.device, p.num_processes, p.device_map) == ("fsdp", "cpu", 2, "cpu")
    assert p.env["UNSLOTH_FSDP2"] == "1" and p.env["UNSLOTH_FORCE_CPU"] == "1"


@pytest.mark.parametrize(
    ("env", "inventory", "message"),
    [
        ({"PARALLELISM": "fsdp", "NUM_GPUS": "1"}, "4x80", "PARALLELISM=fsdp shards .* but NUM_GPUS=1 gives one"),
        ({"PARALLELISM": "fsdp"}, "1x80", "but one visible GPU gives one; give it 2 or more GPUs"),
        ({"PARALLELISM": "fsdp", "CPU_PROCESSES": "1"}, "none", "CPU_PROCESSES=1 gives one; set CPU_PROCESSES=2"),
        ({"PARALLELISM": "fsdp"}, "none", "PARALLELISM=fsdp needs GPUs but none is visible"),
        ({"PARALLELISM": "ddp", "UNSLOTH_FSDP2": "1"}, "2x80", "UNSLOTH_FSDP2='1' is set.*mode is ddp"),
        ({"CPU_PROCESSES": "2", "UNSLOTH_FSDP2": "true"}, "none", "use PARALLELISM=fsdp .* or unset UNSLOTH_FSDP2"),
    ],
)
def test_impossible_fsdp_requests_are_refused_with_the_value_and_the_fix(env, inventory, message):
    with pytest.raises(BadInput, match=message):
        make(env, gpus.assumed(inventory) if inventory != "none" else [])


def test_a_switched_off_unsloth_fsdp2_variable_is_no_conflict():
    assert make({"PARALLELISM": "ddp", "UNSLOTH_FSDP2": "0"}, gpus.assumed("2x80")).mode == "ddp"


def test_fsdp_plans_exports_that_merge_the_whole_model_after_training():
    # The main process merges from the saved adapter once every rank is done (trainer/export.py).
    loaded = catalog.load("smoke", ["output.save=[adapter,merged_16bit]"])
    assert make({"PARALLELISM": "fsdp", "CPU_PROCESSES": "2"}, [], loaded=loaded).mode == "fsdp"


def test_fsdp_on_the_cpu_refuses_a_quantized_load():
    loaded = catalog.load("smoke", ["model.load_in=4bit"])
    with pytest.raises(BadInput, match="cannot shard model.load_in=4bit.*set model.load_in=16bit"):
        make({"PARALLELISM": "fsdp", "CPU_PROCESSES": "2"}, [], loaded=loaded)


# ---- memory and the automatic choice


def test_fsdp_shares_the_trainable_state_per_gpu_while_the_weights_fit_unslothss_fit_layout(full_8b):
    est = memory.estimate(full_8b.recipe)
    per_gpu = memory.per_gpu_gib(est, "fsdp", 4, 4, 80)
    assert est.weights_gib <= memory.FSDP_FIT_FRACTION * 80  # frozen-or-gathered weights stay whole
    assert per_gpu == pytest.approx(est.total_gib - est.trainable_gib * 3 / 4, abs=0.02)


def test_fsdp_shards_everything_when_the_weights_are_too_big_for_the_fit_layout(big_recipe):
    est = memory.estimate(catalog.load(str(big_recipe)).recipe)
    per_gpu = memory.per_gpu_gib(est, "fsdp", 8, 8, 80)
    assert est.weights_gib > memory.FSDP_FIT_FRACTION * 80
    assert (est.weights_gib + est.trainable_gib) / 8 < per_gpu < est.total_gib / 4


def test_auto_shards_full_fine_tuning_that_does_not_fit_one_gpu_with_fsdp(full_8b):
    p = make({}, gpus.assumed("4x80"), loaded=full_8b)
    assert (p.mode, p.num_processes) == ("fsdp", 4)
    assert "every GPU training its own batches" in p.reason
    assert p.memory["per_gpu_gib"] < p.memory["total_gib"] and not p.warnings


def test_auto_shards_a_model_too_big_for_one_gpu_across_machines_with_fsdp(big_recipe):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}
    p = make(env, gpus.assumed("8x80"), loaded=catalog.load(str(big_recipe)))
    assert (p.mode, p.num_processes) == ("fsdp", 16)
    assert "model parallel cannot span machines" in p.reason


def test_auto_refuses_across_machines_when_even_fsdp_does_not_fit(big_recipe):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "NUM_GPUS": "1"}
    with pytest.raises(BadInput, match=r"sharded over the 2 GPUs of this job \(fsdp\) still ~[\d.]+ GiB per GPU"):
        make(env, gpus.assumed("1x24"), loaded=catalog.load(str(big_recipe)))


def test_the_bundled_full_fine_tuning_recipe_is_sharded_by_auto_as_its_header_says():
    loaded = catalog.load("llama-3.1-8b-full-fsdp")
    assert "PARALLELISM=auto picks fsdp" in loaded.path.read_text()
    assert make({}, gpus.assumed("4x80"), loaded=loaded).mode == "fsdp"


def test_full_fine_tuning_that_fits_nowhere_suggests_an_8bit_optimizer_not_a_4bit_load(full_8b):
    with pytest.raises(BadInput, match=r"use an 8-bit optimizer \(training.optimizer=adamw_8bit\)"):
        make({}, gpus.assumed("1x80"), loaded=full_8b)


@pytest.mark.parametrize("inventory", ["4x80", "8x80", "2x141"])
def test_auto_shards_a_lora_model_no_gpu_holds_over_every_gpu_in_use(big_recipe, inventory):
    # Every GPU trains its own batches: model parallel would run the layers one GPU at a time.
    p = make({}, gpus.assumed(inventory), loaded=catalog.load(str(big_recipe)))
    count, gib = (float(n) for n in inventory.split("x"))
    assert (p.mode, p.num_processes, len(p.gpu_ids)) == ("fsdp", count, count)
    assert "does not fit one" in p.reason and "every GPU training its own batches" in p.reason
    assert "model parallel would hold ~" in p.reason and p.memory["per_gpu_gib"] <= 0.92 * gib


def test_auto_keeps_model_parallel_where_only_a_split_fits(big_recipe):
    # A 4-bit load cannot be sharded as it loads: every rank would hold all 4-bit weights (~37 GiB) first.
    p = make({}, gpus.assumed("4x24"), loaded=catalog.load(str(big_recipe), ["model.load_in=4bit"]))
    assert p.mode == "model" and "sharded with fsdp it would need ~" in p.reason


def test_the_plan_shows_each_gpus_memory_in_the_other_modes(big_recipe):
    p = make({}, gpus.assumed("4x80"), loaded=catalog.load(str(big_recipe)))
    others = p.memory["alternatives_per_gpu_gib"]
    assert set(others) == {"ddp", "model"} and others["ddp"] == p.memory["total_gib"]
    assert others["model"] < p.memory["per_gpu_gib"] < others["ddp"]


def test_a_16bit_model_loads_shard_by_shard_under_fsdp(big_recipe):
    p = make({"PARALLELISM": "fsdp"}, gpus.assumed("4x80"), loaded=catalog.load(str(big_recipe)))
    mem = p.memory
    assert mem["load_per_gpu_gib"] == pytest.approx(mem["weights_gib"] / 4 + memory.CUDA_OVERHEAD_GIB, abs=0.02)
    assert mem["per_gpu_gib"] == max(mem["load_per_gpu_gib"], mem["train_per_gpu_gib"])


def test_a_quantized_load_under_fsdp_counts_the_whole_model_on_every_rank_while_it_loads(big_recipe):
    loaded = catalog.load(str(big_recipe), ["model.load_in=4bit"])
    p = make({"PARALLELISM": "fsdp"}, gpus.assumed("4x80"), loaded=loaded)
    mem = p.memory
    assert mem["load_per_gpu_gib"] == pytest.approx(mem["weights_gib"] + memory.CUDA_OVERHEAD_GIB, abs=0.02)
    assert mem["per_gpu_gib"] == mem["load_per_gpu_gib"] > mem["train_per_gpu_gib"]


def test_plan_says_how_fsdp_loads_a_quantized_model(big_recipe, tmp_path):
    env = clean_env(PARALLELISM="fsdp")
    done = run_cli("plan", str(big_recipe), "model.load_in=4bit", "--assume-gpus", "4x80", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "each rank loads the whole" in done.stdout and "only 16-bit weights load shard by shard" in done.stdout


# ---- the training program


def test_training_program_refuses_fsdp_in_a_single_process(tmp_path):
    done = run_training_program(tmp_path, "fsdp")
    assert done.returncode == 2
    assert "--mode fsdp shards the model over the processes" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
