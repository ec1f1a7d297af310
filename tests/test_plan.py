"""Planning: every mode x NUM_GPUS x inventory, the trap, and each bad input. No torch here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import plan_for

from entrypoint import gpus, plan
from recipes import catalog
from recipes.errors import BadInput

SMOKE = catalog.load("smoke")
INVENTORIES = {
    "none": [],
    "1x80": gpus.assumed("1x80"),
    "2x80": gpus.assumed("2x80"),
    "4x80": gpus.assumed("4x80"),
    "4x24": gpus.assumed("4x24"),
}


def make(env: dict[str, str], inventory: list[gpus.Gpu], loaded=SMOKE, cwd: str = "/work") -> plan.Plan:
    return plan_for(env, loaded, inventory, cwd)


# ---- the full matrix: every combination plans or is refused, and plans keep their invariants


@pytest.mark.parametrize(
    ("mode", "num_gpus", "inventory"),
    list(itertools.product(["auto", "single", "ddp", "model", "fsdp"], [None, "1", "2", "4", "8"], INVENTORIES)),
)
def test_every_combination_plans_consistently_or_is_refused(mode, num_gpus, inventory):
    env = {"PARALLELISM": mode} | ({"NUM_GPUS": num_gpus} if num_gpus else {})
    visible = INVENTORIES[inventory]
    try:
        p = make(env, visible)
    except BadInput as exc:
        # Refused only for a reason the user can fix, and the message names the value.
        wanted = int(num_gpus) if num_gpus else len(visible)
        fixable = (
            wanted > len(visible)
            or not visible
            or (mode == "single" and num_gpus and wanted > 1)
            or (mode == "fsdp" and wanted == 1)
        )
        assert fixable, str(exc)
        assert ("NUM_GPUS" in str(exc)) or ("PARALLELISM" in str(exc))
        return
    wanted = int(num_gpus) if num_gpus else len(visible)
    assert p.num_machines == 1 and p.machine_rank == 0
    if p.mode in ("ddp", "fsdp"):
        assert p.mode == mode or mode == "auto"
        assert p.num_processes == len(p.gpu_ids) == wanted > 1
        assert ("UNSLOTH_FSDP2" in p.env) == (p.mode == "fsdp")
        assert p.accelerate_config["num_processes"] == wanted
        assert p.command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
        assert p.device_map == {"": "LOCAL_RANK"}
    elif p.mode == "model":
        assert mode in ("model", "auto")
        assert p.num_processes == 1 and p.accelerate_config is None
        assert p.device_map == "balanced" and len(p.gpu_ids) == wanted
        assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(p.gpu_ids)
    else:
        assert p.num_processes == 1 and p.accelerate_config is None
        assert len(p.gpu_ids) == (1 if visible else 0)
    assert "--mode" in p.command and p.command[p.command.index("--mode") + 1] == p.mode


# ---- the decisions, one behaviour each


def test_auto_on_four_gpus_with_a_small_model_is_ddp_over_all_four():
    p = make({}, INVENTORIES["4x80"])
    assert (p.mode, p.num_processes, p.gpu_ids) == ("ddp", 4, ["0", "1", "2", "3"])


def test_auto_on_one_gpu_is_single():
    assert make({}, INVENTORIES["1x80"]).mode == "single"


# GRPO generates with the whole model in each process, so fsdp cannot train it: a model no GPU holds
# is split over the GPUs instead (model parallel).
GRPO = ["training.method=grpo", "data.format=prompt", "training.grpo.rewards=[answer_tags]"]


def test_auto_picks_model_parallel_when_the_model_cannot_fit_one_gpu_and_fsdp_cannot_train_it(big_recipe):
    p = make({}, INVENTORIES["4x80"], loaded=catalog.load(str(big_recipe), GRPO))
    assert p.mode == "model" and p.num_processes == 1 and p.device_map == "balanced"
    assert "does not fit one 80 GiB GPU" in p.reason
    assert "fsdp is out: training.method grpo cannot train under it" in p.reason


def test_auto_splits_a_model_over_the_fewest_gpus_it_needs(big_recipe):
    loaded = catalog.load(str(big_recipe), GRPO)
    p = make({}, gpus.assumed("8x80"), loaded=loaded)
    k = len(p.gpu_ids)
    assert p.mode == "model" and 1 < k < 8 and f"over {k} of the 8 GPUs" in p.reason
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(k))
    assert p.memory["per_gpu_gib"] <= 80 * 0.92
    fewer = plan.memory.per_gpu_gib(plan.memory.estimate(loaded.recipe), "model", 1, k - 1, 80)
    assert fewer > 80 * 0.92, "one GPU fewer would not fit"


def test_an_explicit_num_gpus_is_used_whole_by_auto_model_parallel(big_recipe):
    p = make({"NUM_GPUS": "8"}, gpus.assumed("8x80"), loaded=catalog.load(str(big_recipe), GRPO))
    assert p.mode == "model" and len(p.gpu_ids) == 8


def test_auto_refuses_with_numbers_when_nothing_fits(big_recipe):
    with pytest.raises(
        BadInput, match=r"needs ~\d+.* GiB, and split over the 2 GPU\(s\) in use still ~[\d.]+ GiB on each 24 GiB GPU"
    ):
        make({"NUM_GPUS": "2"}, INVENTORIES["4x24"], loaded=catalog.load(str(big_recipe)))


def test_explicit_ddp_with_a_model_too_big_warns_but_plans(big_recipe):
    p = make({"PARALLELISM": "ddp"}, INVENTORIES["4x80"], loaded=catalog.load(str(big_recipe)))
    assert p.mode == "ddp" and any("out-of-memory" in w for w in p.warnings)


def test_num_gpus_one_under_ddp_means_single():
    p = make({"PARALLELISM": "ddp", "NUM_GPUS": "1"}, INVENTORIES["4x80"])
    assert p.mode == "single" and p.gpu_ids == ["0"] and p.accelerate_config is None


def test_model_mode_on_one_gpu_is_one_balanced_process():
    p = make({"PARALLELISM": "model", "NUM_GPUS": "1"}, INVENTORIES["4x80"])
    assert (p.mode, p.device_map, p.gpu_ids) == ("model", "balanced", ["0"])


@pytest.mark.parametrize("alias", ["balanced", "model-parallel", "mp", "MODEL", " model "])
def test_model_mode_aliases(alias):
    assert make({"PARALLELISM": alias}, INVENTORIES["2x80"]).mode == "model"


def test_ddp_gpu_ids_are_the_parents_ids_not_renumbered():
    visible = [gpus.Gpu(id="2"), gpus.Gpu(id="3")]
    p = make({"PARALLELISM": "ddp"}, visible)
    assert p.accelerate_config["gpu_ids"] == "2,3"
    assert p.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_cpu_processes_plan_gloo_ddp_without_gpus():
    p = make({"CPU_PROCESSES": "2"}, [])
    assert (p.mode, p.device, p.num_processes, p.mixed_precision) == ("ddp", "cpu", 2, "no")
    assert p.accelerate_config["gpu_ids"] == "all"
    assert p.env["UNSLOTH_FORCE_CPU"] == "1" and p.env["CUDA_VISIBLE_DEVICES"] == ""


def test_no_gpu_with_a_cpu_recipe_plans_single_on_the_cpu():
    p = make({}, [])
    assert (p.mode, p.device, p.device_map) == ("single", "cpu", "cpu")


def test_mixed_precision_is_bf16_on_modern_gpus_and_fp16_on_old_ones(big_recipe):
    loaded = catalog.load(str(big_recipe))
    assert make({}, INVENTORIES["4x80"], loaded=loaded).mixed_precision == "bf16"
    t4 = [gpus.Gpu(id=str(i), name="Tesla T4", memory_gib=80) for i in range(4)]
    assert make({}, t4, loaded=loaded).mixed_precision == "fp16"


def test_output_folder_defaults_to_outputs_dir_and_recipe_name():
    p = make({"OUTPUTS_DIR": "/data/runs"}, [])
    assert p.output_dir == "/data/runs/smoke"
    assert set(p.files) == {"/data/runs/smoke/launch/recipe.yaml", "/data/runs/smoke/launch/plan.json"}


def test_ddp_plan_writes_its_accelerate_config_beside_the_resolved_recipe():
    p = make({"PARALLELISM": "ddp"}, INVENTORIES["2x80"])
    config = "/work/outputs/smoke/launch/accelerate_config.yaml"
    assert config in p.files and p.command[p.command.index("--config_file") + 1] == config


# ---- the trap and bad input


def test_model_mode_inside_a_multi_process_launch_is_refused_with_the_reason():
    with pytest.raises(BadInput) as exc:
        make({"PARALLELISM": "model", "LOCAL_RANK": "0"}, INVENTORIES["2x80"])
    message = str(exc.value)
    assert "LOCAL_RANK is set" in message and "device_map='auto' in any distributed mode" in message
    assert "PARALLELISM=ddp" in message


def test_any_mode_inside_another_launcher_is_refused():
    with pytest.raises(BadInput, match="inside another launcher"):
        make({"TORCHELASTIC_RUN_ID": "x"}, INVENTORIES["2x80"])


def test_cluster_variables_are_not_mistaken_for_a_launcher():
    # A one-pod PyTorchJob with nprocPerNode 4: WORLD_SIZE and RANK are set on the pod itself.
    env = {"PARALLELISM": "model", "WORLD_SIZE": "4", "RANK": "0", "PET_NPROC_PER_NODE": "4", "MASTER_ADDR": "m-0"}
    p = make(env, INVENTORIES["4x80"])
    assert (p.mode, p.num_machines) == ("model", 1)
    # The single-process child must not see them, or it would believe it is one rank of four.
    assert {"WORLD_SIZE", "RANK", "MASTER_ADDR", "PET_NPROC_PER_NODE"} <= set(p.env_unset)


@pytest.mark.parametrize(
    ("env", "inventory", "message"),
    [
        ({"PARALLELISM": "tensor"}, "2x80", "PARALLELISM='tensor' is not a mode"),
        ({"NUM_GPUS": "0"}, "2x80", "NUM_GPUS='0' must be at least 1"),
        ({"NUM_GPUS": "-2"}, "2x80", "NUM_GPUS='-2' must be at least 1"),
        ({"NUM_GPUS": "two"}, "2x80", "NUM_GPUS='two' is not a whole number"),
        ({"NUM_GPUS": "3"}, "2x80", r"NUM_GPUS=3 but only 2 GPU\(s\) are visible \(0,1\)"),
        ({"PARALLELISM": "ddp"}, "none", "needs GPUs but none is visible: did the container get --gpus all"),
        ({"PARALLELISM": "single", "NUM_GPUS": "2"}, "2x80", "PARALLELISM=single uses one GPU but NUM_GPUS=2"),
        ({"CPU_PROCESSES": "0"}, "none", "CPU_PROCESSES='0' must be at least 1"),
        ({"CPU_PROCESSES": "2", "PARALLELISM": "model"}, "none", "cannot run on the CPU"),
        ({"ALLOW_CPU": "maybe"}, "none", "ALLOW_CPU='maybe' is not a yes/no value"),
    ],
)
def test_bad_environment_is_refused_with_the_value_and_the_fix(env, inventory, message):
    with pytest.raises(BadInput, match=message):
        make(env, INVENTORIES[inventory])


def test_a_gpu_recipe_on_a_host_without_gpu_asks_about_gpus_all(big_recipe):
    with pytest.raises(BadInput, match="did the container get --gpus all.*ALLOW_CPU=1"):
        make({}, [], loaded=catalog.load(str(big_recipe)))


def test_allow_cpu_lets_a_gpu_recipe_plan_on_the_cpu(big_recipe):
    assert make({"ALLOW_CPU": "1"}, [], loaded=catalog.load(str(big_recipe))).device == "cpu"


def test_plan_is_pure_and_writes_nothing(tmp_path: Path):
    make({"PARALLELISM": "ddp"}, INVENTORIES["2x80"], cwd=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_child_finds_the_project_first_and_once_on_pythonpath():
    root = str(plan.PROJECT_ROOT)
    # The image sets PYTHONPATH to the project root itself; a user's own entries follow it.
    assert make({"PYTHONPATH": root}, []).env["PYTHONPATH"] == root
    assert make({"PYTHONPATH": f"/mine:{root}"}, []).env["PYTHONPATH"] == f"{root}:/mine"


@pytest.mark.parametrize(("ram_gib", "warned"), [(4.0, True), (64.0, False)])
def test_a_recipe_that_merges_at_the_end_is_warned_when_memory_is_short(ram_gib, warned):
    import dataclasses

    from entrypoint import environment, host

    loaded = catalog.load("llama-3.2-3b-lora-alpaca")  # output.save: [adapter, merged_16bit]
    facts = host.gather({"HF_HUB_OFFLINE": "1"}, loaded.recipe, "/work", ask_hub=False)
    facts = dataclasses.replace(facts, gpus=gpus.assumed("1x80"), ram_available_gib=ram_gib)
    p = plan.make(environment.read({}), loaded, facts)
    merge = [w for w in p.warnings if "output.save merges the 3B-parameter model on the CPU" in w]
    assert bool(merge) == warned, p.warnings
    if warned:
        assert "~7.3 GiB of memory, but 4.0 GiB is available now" in merge[0]
