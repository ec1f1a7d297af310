"""Property-based: over the environment variables and over recipe overrides, every input
either plans or is refused with one BadInput that names the value; nothing else escapes, and
through the command line a refusal is exit status 2 with no traceback and nothing written."""

from __future__ import annotations

import contextlib
import io
import os
import string
from pathlib import Path

import pytest
from conftest import plan_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrypoint import cli, environment, gpus
from recipes import catalog, modes
from recipes.errors import BadInput
from recipes.schema import Recipe

SMOKE = catalog.load("smoke")
text = st.text(alphabet=string.ascii_letters + string.digits + " -_.:/=,", max_size=12)
numbers = st.integers(min_value=-3, max_value=12).map(str)


def maybe(values):
    return st.one_of(st.none(), values)


environments = st.fixed_dictionaries(
    {},
    optional={
        "PARALLELISM": st.one_of(st.sampled_from(list(environment.PARALLELISM_ALIASES)), text),
        "NUM_GPUS": st.one_of(numbers, st.just("all"), text),
        "CPU_PROCESSES": st.one_of(numbers, text),
        "ALLOW_CPU": st.sampled_from(["0", "1", "yes", "maybe", ""]),
        "NNODES": st.one_of(numbers, text),
        "NODE_RANK": st.one_of(numbers, text),
        "MASTER_ADDR": st.sampled_from(["10.0.0.1", "job-master-0", ""]),
        "MASTER_PORT": st.one_of(st.integers(-5, 70000).map(str), text),
        "PET_NPROC_PER_NODE": st.one_of(numbers, st.sampled_from(["auto", "gpu", "cpu"])),
        "LOCAL_RANK": st.sampled_from(["0", "1"]),
        "WORLD_SIZE": numbers,
        "RANK": numbers,
        "UNSLOTH_FSDP2": st.sampled_from(["0", "1", ""]),
    },
)


@settings(max_examples=400, deadline=None)
@given(env=environments, gpu_count=st.integers(0, 8), memory=maybe(st.sampled_from([16.0, 24.0, 80.0])))
def test_every_environment_plans_or_is_refused_with_the_value_named(env, gpu_count, memory):
    inventory = [gpus.Gpu(id=str(i), memory_gib=memory) for i in range(gpu_count)]
    try:
        p = plan_for(env, SMOKE, inventory, "/w")
    except BadInput as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert any(name in message for name in env) or "GPU" in message or "recipe" in message, message
        return
    assert p.num_processes >= 1 and p.num_machines >= 1 and 0 <= p.machine_rank < p.num_machines
    assert p.mode in modes.MODES
    assert (p.mode in modes.MULTI_PROCESS) == (p.accelerate_config is not None)
    assert p.mode != "fsdp" or (p.num_processes >= 2 and p.env["UNSLOTH_FSDP2"] == "1")
    assert p.mode != "model" or (p.num_processes == 1 and p.num_machines == 1 and "LOCAL_RANK" not in env)


values = st.one_of(
    st.integers(-10, 10_000).map(str),
    st.floats(-1, 10, allow_nan=False).map(repr),
    st.sampled_from(["true", "false", "null", "[]", "[q_proj, v_proj]", "{a: 1}", "'x'", "4bit", "dpo", ""]),
    text,
)
keys = st.one_of(st.sampled_from(catalog.all_dotted_keys()), text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), min_size=1, max_size=3))
def test_every_override_is_applied_or_refused_with_a_clear_message(overrides):
    try:
        loaded = catalog.load("smoke", overrides)
    except BadInput as exc:
        assert str(exc)
        return
    recipe = loaded.recipe  # what loads is a valid recipe: it survives the schema once more unchanged
    assert Recipe.model_validate(recipe.model_dump()) == recipe


@pytest.mark.parametrize(
    "env",
    [
        {"PARALLELISM": "x"},
        {"NUM_GPUS": "-1"},
        {"NNODES": "2"},
        {"MASTER_PORT": "99999", "NNODES": "2", "MASTER_ADDR": "m"},
    ],
)
def test_through_the_command_line_a_refusal_is_status_2_without_traceback_and_writes_nothing(
    tmp_path, monkeypatch, env
):
    monkeypatch.chdir(tmp_path)
    for name in ("PARALLELISM", "NUM_GPUS", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CPU_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(["run", "smoke"])
    assert status == 2 and err.getvalue().startswith("error: ") and "Traceback" not in err.getvalue()
    assert list(Path(os.getcwd()).iterdir()) == []
