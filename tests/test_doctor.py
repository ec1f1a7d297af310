"""`doctor`: facts without torch, the known stalls with their fixes, and secrets never shown."""

from __future__ import annotations

import json

from conftest import clean_env, run_cli

from entrypoint import doctor


def facts(**changes) -> doctor.Facts:
    base = dict(
        gpus=[{"id": "0", "name": "H100", "memory_gib": 79.6}, {"id": "1", "name": "H100", "memory_gib": 79.6}],
        driver="580.1",
        cuda="13.0",
        packages=dict.fromkeys(doctor.PACKAGES, "1.0"),
        shm_gib=64.0,
        memlock=None,
        stack=None,
        variables={},
    )
    return doctor.Facts(**(base | changes))


def test_a_well_set_up_machine_has_no_warnings():
    assert doctor.warnings(facts()) == []


def test_docker_default_shm_is_flagged_with_ipc_host():
    (warning,) = doctor.warnings(facts(shm_gib=0.06))
    assert "/dev/shm is 0.06 GiB" in warning and "--ipc=host" in warning and "medium: Memory" in warning


def test_limited_memlock_on_several_gpus_is_flagged_with_the_ulimit():
    (warning,) = doctor.warnings(facts(memlock=8 * 1024 * 1024))
    assert "--ulimit memlock=-1" in warning


def test_small_stack_is_flagged():
    (warning,) = doctor.warnings(facts(stack=8 * 1024 * 1024))
    assert "--ulimit stack=67108864" in warning


def test_no_gpu_asks_for_gpus_all():
    assert any("--gpus all" in w for w in doctor.warnings(facts(gpus=[])))


def test_secret_values_are_never_printed_but_their_presence_is():
    shown = doctor.redacted({"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k", "NCCL_DEBUG": "INFO", "HOME": "/h"})
    assert shown == {"HF_TOKEN": "(set, hidden)", "NCCL_DEBUG": "INFO", "WANDB_API_KEY": "(set, hidden)"}


def test_doctor_runs_here_and_hides_tokens(tmp_path):
    env = clean_env(HF_TOKEN="hf_supersecret", MY_DB_PASSWORD="pw123", NCCL_DEBUG="INFO")
    done = run_cli("doctor", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    for section in ("GPUs", "packages", "system", "variables"):
        assert section in done.stdout
    assert "NCCL_DEBUG=INFO" in done.stdout and "HF_TOKEN=(set, hidden)" in done.stdout
    assert "hf_supersecret" not in done.stdout + done.stderr and "pw123" not in done.stdout
    data = json.loads(run_cli("doctor", "--json", cwd=tmp_path, env=env).stdout)
    assert data["packages"]["transformers"] and "hf_supersecret" not in json.dumps(data)


def test_plan_never_prints_secrets_from_the_environment(tmp_path):
    env = clean_env(HF_TOKEN="hf_supersecret", WANDB_API_KEY="wandb_secret")
    for args in (["plan", "smoke"], ["plan", "smoke", "--json"]):
        done = run_cli(*args, cwd=tmp_path, env=env)
        assert done.returncode == 0 and "supersecret" not in done.stdout and "wandb_secret" not in done.stdout
