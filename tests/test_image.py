"""The ways users run it: the Dockerfile (lint, what it copies, its volumes, its very command),
docker-compose.yml and the Kubernetes files (against their schemas).
CI has the docker client only, so the image's command runs here on the CPU, as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, clean_env, plan_for

DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
KUBE = ROOT / "deploy" / "kubernetes"
KUBE_VERSION = "1.37.0"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage and earlier ones, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def volumes() -> list[str]:
    return [v for word, rest in final_stage() if word == "VOLUME" for v in json.loads(rest)]


def exec_form(word: str) -> list[str]:
    return next(json.loads(rest) for w, rest in final_stage() if w == word)


# ---- the Dockerfile


def test_hadolint_passes():
    done = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_everything_the_dockerfile_copies_exists():
    copies = [rest.split() for word, rest in instructions() if word == "COPY" and "--from" not in rest]
    assert copies
    for words in copies:
        for source in words[:-1]:
            assert (ROOT / source).exists(), source


def test_every_path_the_stack_writes_is_under_a_declared_volume():
    env, declared = image_env(), volumes()
    writable = [
        "OUTPUTS_DIR",
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "UNSLOTH_COMPILE_LOCATION",
        "UNSLOTH_MEGA_CACHE_DIR",
        "MPLCONFIGDIR",
        "TMPDIR",
    ]
    for name in writable:
        assert any(env[name] == v or env[name].startswith(v + "/") for v in declared), f"{name}={env[name]}"
    workdir = next(rest for word, rest in final_stage() if word == "WORKDIR")
    assert any(workdir == v or workdir.startswith(v + "/") for v in declared)


def test_the_image_runs_as_a_numeric_non_root_user():
    user = next(rest for word, rest in final_stage() if word == "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_no_secret_is_baked_into_the_image():
    assert not {"HF_TOKEN", "WANDB_API_KEY"} & set(image_env())
    assert not any(word == "ARG" and "TOKEN" in rest.upper() for word, rest in instructions())


def map_container_path(value: str, root: Path) -> str:
    """The image's paths, made real on this machine: /workspace -> a temp folder, /app -> the repo."""
    value = value.replace("/workspace", str(root / "workspace")).replace("/opt/venv/bin", str(BIN))
    return value.replace("/app", str(ROOT)).replace("$PATH", os.environ["PATH"])


def test_the_images_own_command_trains_the_smoke_recipe_on_the_cpu(tmp_path):
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint[:2] == ["tini", "--"], "tini must be PID 1 to reap orphans"
    if shutil.which("tini") is None:
        entrypoint = entrypoint[2:]  # tini only reaps orphans and passes signals on
    env = clean_env(**{k: map_container_path(v, tmp_path) for k, v in image_env().items()})
    env.pop("VIRTUAL_ENV", None)
    for folder in volumes():
        Path(map_container_path(folder, tmp_path)).mkdir(parents=True, exist_ok=True)
    workdir = Path(map_container_path(next(rest for word, rest in final_stage() if word == "WORKDIR"), tmp_path))
    env["TMPDIR"] = str(tmp_path)  # the host's /tmp stands in for the container's tmp volume
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout

    done = subprocess.run([*entrypoint, "smoke"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "workspace" / "outputs" / "smoke"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before, "the run wrote into the application folder"

    help_run = subprocess.run(entrypoint, cwd=workdir, env=env, capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0 and "bundled recipes:" in help_run.stdout


# ---- docker compose


def test_compose_file_validates_against_the_compose_spec():
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_reserves_gpus_prevents_the_known_stalls_and_passes_secrets_through():
    train = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["train"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert train["ipc"] == "host" and train["ulimits"]["memlock"] == -1
    assert "HF_TOKEN" in train["environment"], "the token passes through from the host, without a value"
    assert any(e.startswith("PARALLELISM=${PARALLELISM") for e in train["environment"])
    assert train["read_only"] is True and "/tmp" in train["tmpfs"]


# ---- Kubernetes


def kube_documents() -> list[tuple[str, dict]]:
    return [
        (path.name, doc) for path in sorted(KUBE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def pod_specs(doc: dict) -> list[dict]:
    """Every PodSpec inside a resource, wherever its kind keeps it."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                found.append(node)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc.get("spec", {}))
    return found


@pytest.mark.parametrize(
    "name,doc", [d for d in kube_documents() if not d[1]["apiVersion"].startswith(("kubeflow", "trainer"))]
)
def test_kubernetes_resources_validate_strictly_against_kubernetes_schemas(name, doc):
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "name,doc", [d for d in kube_documents() if d[1]["apiVersion"].startswith(("kubeflow", "trainer"))]
)
def test_kubeflow_pod_templates_validate_against_kubernetes_schemas(name, doc):
    # No schema for the Kubeflow CRDs ships offline; the pods inside them are core/v1 PodSpecs.
    if doc["kind"] == "TrainJob":  # its pods come from the TrainingRuntime, checked as such
        assert doc["spec"]["trainer"]["args"] and "command" not in doc["spec"]["trainer"]
        return
    specs = pod_specs(doc)
    assert specs
    for spec in specs:
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": {"spec": spec},
        }
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name,doc", [d for d in kube_documents() if pod_specs(d[1])])
def test_every_pod_is_non_root_read_only_with_shm_volumes_and_the_token_from_a_secret(name, doc):
    for spec in pod_specs(doc):
        assert spec["securityContext"]["runAsNonRoot"] is True
        volumes_by_name = {v["name"]: v for v in spec["volumes"]}
        assert volumes_by_name["dshm"]["emptyDir"]["medium"] == "Memory"
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/dev/shm", "/workspace/outputs", "/workspace/cache", "/tmp"} <= mounts
            token = [e for e in container.get("env", []) if e["name"] == "HF_TOKEN"]
            assert all("secretKeyRef" in e["valueFrom"] for e in token)


@pytest.mark.parametrize("name,doc", [d for d in kube_documents() if d[1]["kind"] == "Job"])
def test_every_one_pod_job_plans_the_mode_it_names_on_the_gpus_it_requests(name, doc):
    from entrypoint import environment, gpus
    from recipes import catalog

    (container,) = doc["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    count = int(container["resources"]["limits"]["nvidia.com/gpu"])
    loaded = catalog.load(container["args"][0], container["args"][1:])
    p = plan_for(env, loaded, gpus.assumed(f"{count}x80"), "/workspace")
    assert p.mode == environment.parse_parallelism(env["PARALLELISM"]) and not p.warnings
    assert len(p.gpu_ids) == count
