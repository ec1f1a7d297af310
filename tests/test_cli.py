"""The command line as users meet it: exit statuses, messages, and nothing written on bad input."""

from __future__ import annotations

import json

import pytest
from conftest import clean_env, run_cli, write_recipe

from recipes import catalog

PLAN_KEYS = {
    "mode",
    "num_processes",
    "num_machines",
    "machine_rank",
    "gpu_ids",
    "command",
    "accelerate_config",
    "device_map",
    "env",
}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "smoke"], {"PARALLELISM": "sideways"}, "PARALLELISM='sideways' is not a mode"),
        (["run", "smoke"], {"NUM_GPUS": "0"}, "NUM_GPUS='0' must be at least 1"),
        (["run", "smoke"], {"NUM_GPUS": "lots"}, "NUM_GPUS='lots' is not a whole number"),
        (["run", "smoke"], {"NUM_GPUS": "2"}, "NUM_GPUS=2 needs GPUs but none is visible"),
        (["run", "smoke"], {"PARALLELISM": "model", "LOCAL_RANK": "1"}, "PARALLELISM=model refused"),
        (["run", "smoke"], {"PARALLELISM": "fsdp", "CPU_PROCESSES": "1"}, "but CPU_PROCESSES=1 gives one"),
        (["run", "smoke", "--assume-gpus", "1"], {"PARALLELISM": "fsdp"}, "but one visible GPU gives one"),
        (
            ["run", "smoke", "model.load_in=4bit"],
            {"PARALLELISM": "fsdp", "CPU_PROCESSES": "2"},
            "PARALLELISM=fsdp on the CPU cannot shard model.load_in=4bit",
        ),
        (["run", "smoke"], {"CPU_PROCESSES": "2", "UNSLOTH_FSDP2": "1"}, "UNSLOTH_FSDP2='1' is set"),
        (["run", "no-such-recipe"], {}, "unknown recipe 'no-such-recipe'"),
        (["run", "missing.yaml"], {}, "recipe file 'missing.yaml' does not exist"),
        (["run", "smoke", "training.max_stepz=3"], {}, "did you mean 'training.max_steps'"),
        (["run", "smoke", "lora.r=-1"], {}, "lora.r = -1: Input should be greater than 0"),
        (["plan", "smoke", "--assume-gpus", "many"], {}, "--assume-gpus 'many' is not N or NxGIB"),
        (["run"], {}, "no recipe given"),
        (["frobnicate"], {}, "unknown recipe 'frobnicate'"),
        (["plan", "--bogus-flag", "smoke"], {}, "unrecognized arguments: --bogus-flag"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(tmp_path, args, env, message):
    done = run_cli(*args, cwd=tmp_path, env=clean_env(**env))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] != []
    assert list(tmp_path.iterdir()) == []


def test_malformed_recipe_file_exits_2_naming_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x\n")
    done = run_cli("validate", str(bad), cwd=tmp_path)
    assert done.returncode == 2 and "is not valid YAML at line" in done.stderr
    assert "Traceback" not in done.stderr


def test_plan_json_holds_the_documented_keys(tmp_path):
    done = run_cli("plan", "smoke", "--json", "--assume-gpus", "4x80", cwd=tmp_path, env=clean_env(PARALLELISM="ddp"))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert set(plan) >= PLAN_KEYS
    assert (plan["mode"], plan["num_processes"], plan["gpu_ids"]) == ("ddp", 4, ["0", "1", "2", "3"])
    assert plan["accelerate_config"]["distributed_type"] == "MULTI_GPU"
    assert list(tmp_path.iterdir()) == []


def test_plan_text_shows_the_accelerate_config_and_command(tmp_path):
    done = run_cli("plan", "smoke", "--assume-gpus", "2", cwd=tmp_path, env=clean_env(PARALLELISM="ddp"))
    assert done.returncode == 0
    assert 'distributed_type: "MULTI_GPU"' in done.stdout and "accelerate.commands.launch" in done.stdout


def test_recipe_variable_serves_when_the_command_line_names_none(tmp_path):
    done = run_cli("plan", "--json", cwd=tmp_path, env=clean_env(RECIPE="smoke"))
    assert done.returncode == 0 and json.loads(done.stdout)["recipe"] == "smoke"


def test_list_names_every_bundled_recipe(tmp_path):
    done = run_cli("list", cwd=tmp_path)
    listed = [line.split()[0] for line in done.stdout.splitlines()]
    assert done.returncode == 0 and listed == sorted(catalog.bundled())


def test_no_arguments_prints_help_and_the_recipe_list(tmp_path):
    done = run_cli(cwd=tmp_path)
    assert done.returncode == 0
    assert "PARALLELISM" in done.stdout and "bundled recipes:" in done.stdout and "smoke" in done.stdout


def test_show_prints_the_resolved_recipe_with_overrides(tmp_path):
    done = run_cli("show", "smoke", "training.max_steps=3", cwd=tmp_path)
    assert done.returncode == 0 and "max_steps: 3" in done.stdout


def test_validate_accepts_a_users_recipe_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "hello world"}\n')
    path = write_recipe(tmp_path, "mine", "model: {name: Qwen/Qwen2.5-7B}\ndata: {source: rows.jsonl, format: text}\n")
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 0 and "valid" in done.stderr and "Qwen/Qwen2.5-7B" in done.stdout


def test_unwritable_output_folder_exits_2_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_cli("run", "smoke", cwd=tmp_path, env=clean_env(OUTPUTS_DIR=str(blocker / "out")))
    assert done.returncode == 2 and "cannot be written" in done.stderr and "OUTPUTS_DIR" in done.stderr


def test_gguf_without_llama_cpp_is_refused_before_training(tmp_path):
    env = clean_env(UNSLOTH_LLAMA_CPP_PATH=str(tmp_path / "no-llama.cpp"))
    done = run_cli("run", "smoke", "output.save=[adapter,gguf]", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "llama.cpp" in done.stderr and "UNSLOTH_LLAMA_CPP_PATH" in done.stderr
    assert not (tmp_path / "outputs").exists()
