"""The ways users run it, checked without an engine: the Dockerfile (lint, what it copies, its
volumes, its user), docker-compose.yml and the Kubernetes examples (rendered by kustomize, as
`kubectl apply -k` sends them, against Kubernetes' schemas). test_docker.py builds the image and
runs it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import ROOT, plan_for, readme_commands

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


# ---- the Dockerfile


def test_hadolint_passes():
    done = subprocess.run([str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_names_no_frontend_to_fetch():
    # BuildKit fetches a `# syntax=` frontend from Docker Hub: offline and mirror-only builds fail.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.I | re.M)


def test_every_network_step_of_the_build_is_retried():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    apt = [r for r in runs if "apt-get" in r]
    pip = [r for r in runs if "pip install" in r]
    assert apt and all(r.count("apt-get ") == r.count("apt-get -o Acquire::Retries=") for r in apt)
    assert pip and all("--retries" in r and "for try in" in r for r in pip)


def test_the_image_installs_the_lock_and_nothing_else():
    # A torch from another index, reinstalled --no-deps over the lock's CUDA 13 libraries, would
    # not import; every package comes from the lock, resolved as a whole, and every file must have
    # a hash the lock holds.
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    installs = [shlex.split(args) for args in re.findall(r"/bin/pip install ([^;&]*)", runs)]
    assert installs
    for words in installs:
        takes_value = {"-r", "--retries", "--timeout", "--cache-dir"}
        named = [w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] not in takes_value]
        assert named == [] and {"--no-deps", "--require-hashes"} <= set(words), words
        assert words[words.index("-r") + 1] == "/tmp/image.lock", words
        assert not any("index-url" in w or "find-links" in w for w in words), words


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


def test_tini_is_pid_1_and_starts_the_launcher():
    # tini reaps orphans and passes docker stop's SIGTERM on; test_docker.py stops a run with it.
    entrypoint = next(json.loads(rest) for word, rest in final_stage() if word == "ENTRYPOINT")
    assert entrypoint == ["tini", "--", "python", "-m", "entrypoint"]


def test_the_image_runs_as_a_numeric_non_root_user():
    user = next(rest for word, rest in final_stage() if word == "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_no_secret_is_baked_into_the_image():
    assert not {"HF_TOKEN", "WANDB_API_KEY"} & set(image_env())
    assert not any(word == "ARG" and "TOKEN" in rest.upper() for word, rest in instructions())


# ---- docker compose


def test_compose_file_validates_against_the_compose_spec():
    done = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def compose_services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_gpu_service_reserves_gpus_prevents_the_known_stalls_and_passes_secrets_through():
    gpu = compose_services()["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["ipc"] == "host" and gpu["ulimits"]["memlock"] == -1 and gpu["ulimits"]["stack"] == 67108864
    assert "HF_TOKEN" in gpu["environment"], "the token passes through from the host, without a value"
    assert any(e.startswith("PARALLELISM=${PARALLELISM") for e in gpu["environment"])
    assert gpu["read_only"] is True and "/tmp" in gpu["tmpfs"]


def test_a_plain_compose_up_starts_only_services_that_need_no_gpu():
    default = {name: s for name, s in compose_services().items() if "profiles" not in s}
    assert default and all("deploy" not in service for service in default.values())


# ---- Kubernetes


def examples(root: Path = KUBE) -> list[Path]:
    """The folders `kubectl apply -k` takes: a kustomization each (../image is a component)."""
    return sorted(
        path.parent
        for path in root.glob("*/kustomization.yaml")
        if yaml.safe_load(path.read_text())["kind"] == "Kustomization"
    )


def rendered(folder: Path) -> list[dict]:
    """What `kubectl apply -k folder` sends: kubectl's own kustomize, offline."""
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def kube_documents() -> list[tuple[str, dict]]:
    plain = [(path.name, doc) for path in sorted(KUBE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    built = [(f"{folder.name}/{doc['kind']}", doc) for folder in examples() for doc in rendered(folder)]
    return [(name, doc) for name, doc in plain + built if doc]


def containers(doc: dict) -> list[dict]:
    """Every container of a resource's pods, init containers included."""
    return [c for spec in pod_specs(doc) for c in spec.get("initContainers", []) + spec["containers"]]


def image_component(root: Path = KUBE) -> dict:
    (entry,) = yaml.safe_load((root / "image" / "kustomization.yaml").read_text())["images"]
    return entry


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
        for init in spec.get("initContainers", []):  # no outputs: they write nothing a run keeps
            assert init["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"/dev/shm", "/workspace/cache", "/tmp"} <= {m["mountPath"] for m in init["volumeMounts"]}


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


def test_the_ddp_example_first_checks_the_collectives_of_the_ranks_its_training_container_starts():
    """An init container runs `doctor --collectives` with the training container's shape (its
    PARALLELISM, NUM_GPUS and GPUs), so a pod whose GPUs cannot talk fails before any weights load."""
    from entrypoint import collectives, environment, gpus

    (doc,) = [doc for name, doc in kube_documents() if name == "ddp/Job"]
    spec = doc["spec"]["template"]["spec"]
    (init,), (train,) = spec["initContainers"], spec["containers"]
    assert init["args"][:2] == ["doctor", "--collectives"] and "--timeout" in init["args"]
    shape = {"PARALLELISM", "NUM_GPUS"}
    assert [e for e in init["env"] if e["name"] in shape] == [e for e in train["env"] if e["name"] in shape]
    count = init["resources"]["limits"]["nvidia.com/gpu"]
    assert count == train["resources"]["limits"]["nvidia.com/gpu"]
    env = {e["name"]: e["value"] for e in init["env"]}
    check = collectives.plan(environment.read(env), gpus.assumed(f"{count}x80"), 300)
    assert (check.backend, check.world_size) == ("nccl", count)


def test_every_pod_runs_the_image_named_in_the_image_component_pulled_only_when_missing():
    entry = image_component()
    assert "example" in entry["newName"], "a placeholder that cannot be mistaken for a real registry"
    assert entry["newTag"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pods = [c for _, doc in kube_documents() for c in containers(doc)]
    assert pods
    for container in pods:
        assert container["image"] == f"{entry['newName']}:{entry['newTag']}"
        assert container["imagePullPolicy"] == "IfNotPresent"
    for _, doc in kube_documents():  # kustomize sets container images only: none may hide elsewhere
        assert values_of(doc, "image", skip=("containers", "initContainers")) == []


def test_the_registry_is_set_in_one_place_for_every_example(tmp_path):
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    component = copy / "image" / "kustomization.yaml"
    component.write_text(component.read_text().replace(image_component()["newName"], "ghcr.io/someone/unsloth-recipes"))
    images = {c["image"] for folder in examples(copy) for doc in rendered(folder) for c in containers(doc)}
    assert images == {f"ghcr.io/someone/unsloth-recipes:{image_component()['newTag']}"}


def test_the_readmes_kubectl_lines_apply_every_example_and_the_volumes():
    applied = {"-k": set(), "-f": set()}
    for line in readme_commands("Kubernetes"):
        words = shlex.split(line)
        if words[:2] == ["kubectl", "apply"]:
            assert len(words) == 4 and words[2] in applied, line
            applied[words[2]].add(ROOT / words[3])
        else:
            assert words[0] == "docker" or words[:3] == ["kubectl", "create", "secret"], f"unchecked line: {line}"
    assert applied["-k"] == set(examples())
    assert applied["-f"] == set(KUBE.glob("*.yaml")) == {KUBE / "pvc.yaml"}


def test_the_readmes_secret_is_the_one_the_pods_read():
    line = next(c for c in readme_commands("Kubernetes") if c.startswith("kubectl create secret"))
    done = subprocess.run(
        [*shlex.split(line), "--dry-run=client", "-o", "yaml"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    secret = yaml.safe_load(done.stdout)
    read = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for _, doc in kube_documents()
        for env in values_of(doc, "env")  # containers' and the TrainJob's alike
        for e in env
        if e["name"] == "HF_TOKEN"
    }
    assert read == {(secret["metadata"]["name"], next(iter(secret["data"])))}


def values_of(node: object, key: str, skip: tuple[str, ...] = ()) -> list:
    """Every value of `key` anywhere in a resource, without looking inside the keys in `skip`."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            found for k, v in node.items() if k not in (key, *skip) for found in values_of(v, key, skip)
        ]
    if isinstance(node, list):
        return [found for v in node for found in values_of(v, key, skip)]
    return []
