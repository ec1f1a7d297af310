"""The image, built and run for real in the Docker engine.

`make image` builds it once per test session, as README.md says (it starts the engine, and builds
the stand-in base where Docker Hub cannot be reached); a build that fails fails every test here.
Every docker and compose command of README.md's Quick start is read out of its code blocks and run
here as written, so the two cannot drift. Where a test does not run a line exactly as written, it
says so; the rules:
- the named volume `hf-cache` becomes a fresh volume of the test (a developer's own cache is never
  touched, and each test starts from an empty one); the tests remove theirs;
- a line with `--gpus all` needs GPUs this machine does not have: it runs without `--gpus all`
  and `--ulimit memlock=-1` (an engine without CAP_SYS_RESOURCE, as this sandboxed one and
  rootless ones, cannot raise memlock: "error setting rlimit type 8"), with `--network none`
  (tests never reach the network), as `plan --assume-gpus 4x80` of the same recipe, variables
  and flags;
- the compose service `gpu` reserves GPUs: `docker compose config` resolves it, and the CPU path
  runs for real.
The Kubernetes lines are checked in test_image.py (rendered with kustomize, against Kubernetes'
schemas); the one they need an engine for, `docker tag`, runs here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import DAMAGE_TOKENIZER, ROOT, clean_env, readme_commands

pytestmark = pytest.mark.docker

IMAGE = "unsloth-recipes"
OTHER_UID = 4321  # a user the image does not know: no /etc/passwd entry, no home
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds, and docker stop's -t below


def readme_command(heading: str, matches: Callable[[str], bool], what: str) -> str:
    found = [c for c in readme_commands(heading) if matches(c)]
    assert len(found) == 1, f"README.md's {heading!r} block should have one {what} command, not {found}"
    return found[0]


def smoke_line() -> str:
    return readme_command("docker run", lambda c: c.startswith("docker run") and c.endswith(f" {IMAGE} smoke"), "smoke")


def gpu_line(recipe: str) -> str:
    return readme_command("docker run", lambda c: "--gpus all" in c and f" {IMAGE} {recipe}" in c, recipe)


def environment() -> dict[str, str]:
    """This machine's environment less the launcher's variables and the secrets that `-e NAME`
    would pass into a container."""
    env = clean_env()
    for name in ("HF_TOKEN", "WANDB_API_KEY", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", "COMPOSE_FILE"):
        env.pop(name, None)
    return env


def sh(command: str, cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """A README line as a user's shell runs it ($PWD, $(id -u), quotes)."""
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env={**environment(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], env=environment(), capture_output=True, text=True, timeout=timeout)


def with_flags(command: str, *flags: str) -> str:
    """`docker run` with more flags, before the image name."""
    before, image, after = command.partition(f" {IMAGE} ")
    assert image, command
    return " ".join([before, *flags, IMAGE, after])


def without(command: str, flag: str) -> str:
    assert f" {flag} " in command, f"{flag!r} not in {command!r}"
    return command.replace(f" {flag} ", " ")


def as_user(command: str, user: int | None) -> str:
    """The README's --user "$(id -u):$(id -g)" as another user, or dropped (the image's UID 1000)."""
    command = without(command, '--user "$(id -u):$(id -g)"')
    return command if user is None else with_flags(command, f"--user {user}:{user}")


def without_gpus(command: str) -> str:
    """A --gpus all line as this machine can start it (see the module's docstring), offline."""
    command = without(command, "--gpus all")
    if " --ulimit memlock=-1 " in command:
        command = without(command, "--ulimit memlock=-1")
    return with_flags(command, "--network none")


def plan_instead(command: str) -> str:
    """A --gpus all line as this machine can run it: its plan for 4 GPUs of 80 GiB."""
    command = without_gpus(command)
    before, _, after = command.partition(f" {IMAGE} ")
    return f"{before} {IMAGE} plan --assume-gpus 4x80 {after}"


def give_to(folder: Path, uid: int) -> None:
    """chown through the engine (root there), so a developer who is not root can run this too."""
    mount = f"{folder}:/mnt"
    done = docker(
        *shlex.split(f"run --rm --user 0:0 --network none -v {mount} --entrypoint chown {IMAGE} -R {uid}:{uid}"), "/mnt"
    )
    assert done.returncode == 0, done.stderr


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The bad-input contract inside the container: exit 2, one `error:` line, no traceback."""
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, output[-3000:]
    assert "Traceback" not in output and done.stderr.rstrip().endswith(errors[0]), output[-3000:]
    return errors[0]


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The README's first command, once per session. A build that fails fails every test using it."""
    assert readme_commands("docker run")[0] == "make image"
    log = tmp_path_factory.mktemp("image") / "make-image.log"
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(["make", "image"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        pytest.fail(f"make image failed (exit {done.returncode}); the end of its log:\n{log.read_text()[-6000:]}")
    print(f"make image: {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.fixture
def volume(image: str) -> Iterator[str]:
    """A fresh named volume in place of the README's hf-cache, removed afterwards."""
    name = f"unsloth-recipes-test-{uuid.uuid4().hex[:12]}"
    yield name
    docker("volume", "rm", "-f", name)


@pytest.fixture
def work(tmp_path: Path, volume: str) -> Callable[[str], str]:
    """A README docker line, made ready to run in tmp_path: its cache volume is the test's own."""

    def ready(command: str) -> str:
        assert "-v hf-cache:/workspace/cache" in command, command
        return command.replace("-v hf-cache:", f"-v {volume}:")

    return ready


def mkdir_outputs(cwd: Path) -> Path:
    mkdir = readme_command("docker run", lambda c: c.startswith("mkdir"), "mkdir")
    assert sh(mkdir, cwd).returncode == 0
    return cwd / "outputs"


def app_sources() -> list[str]:
    """The files of the project's packages (pyproject.toml's: entrypoint/, recipes/, trainer/) in
    this checkout, less what git ignores."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *packages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return listed.stdout.split()


# ---- the image itself


def test_the_image_prints_its_help_and_the_recipe_list(image, tmp_path):
    line = readme_command("docker run", lambda c: c == f"docker run --rm {IMAGE}", "help")
    done = sh(line, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: entrypoint" in done.stdout and "bundled recipes:" in done.stdout
    assert re.search(r"^smoke\s+sft", done.stdout, re.M), done.stdout


def test_the_image_runs_as_app_uid_1000_where_the_base_had_ubuntu(image):
    # The base ships `ubuntu` at UID/GID 1000; `useradd --uid 1000` failed the build on it.
    done = docker("run", "--rm", "--entrypoint", "id", image)
    assert done.stdout.strip() == "uid=1000(app) gid=1000(app) groups=1000(app)", done.stdout + done.stderr


def test_app_holds_the_launcher_and_recipes_as_checked_out_with_their_bytecode_only(image):
    listing = docker("run", "--rm", "--entrypoint", "find", image, "/app", "-type", "f").stdout.split()
    ours = app_sources()
    files = [path.removeprefix("/app/") for path in listing]
    sources = sorted(f for f in files if "__pycache__" not in f)
    assert sources == sorted(ours)
    for compiled in set(files) - set(sources):  # compiled in the image, not a checkout's leftovers
        match = re.fullmatch(r"(.+)/__pycache__/(\w+)\.cpython-312\.pyc", compiled)
        assert match and f"{match[1]}/{match[2]}.py" in ours, compiled


def test_the_build_context_is_only_what_the_dockerfile_copies(image):
    # The engine's own reading of .dockerignore: a throwaway image that copies the whole context.
    tag = f"unsloth-recipes-context-{uuid.uuid4().hex[:12]}"
    built = subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-f-", "."],
        input=f"FROM {image}\nCOPY . /context\n",
        cwd=ROOT,
        env={**environment(), "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert built.returncode == 0, built.stderr
        listing = docker("run", "--rm", "--entrypoint", "find", tag, "/context", "-type", "f").stdout.split()
    finally:
        docker("rmi", "-f", tag)
    ours = app_sources()
    sent = sorted(path.removeprefix("/context/") for path in listing)
    assert sent == sorted([*ours, "requirements/image.lock", "requirements/llama_cpp.py"])


def test_a_c_compiler_and_python_h_build_tritons_cuda_launcher(image):
    # At the first GPU kernel Triton compiles this very file with cc against Python.h ("Failed to
    # find C compiler" without one). Linked here without -lcuda, which comes with a GPU's driver:
    # a shared object may leave symbols to the loader.
    script = """
import os, tempfile
from pathlib import Path
from triton.backends.nvidia import driver
from triton.runtime.build import _build
with tempfile.TemporaryDirectory() as tmp:
    so = _build("cuda_utils", str(Path(driver.__file__).with_name("driver.c")), tmp, [], driver.include_dirs, [], [])
    print("built", os.path.basename(so), os.path.getsize(so))
"""
    done = docker("run", "--rm", "--read-only", "--network", "none", "--entrypoint", "python", image, "-c", script)
    assert done.returncode == 0 and done.stdout.startswith("built cuda_utils"), done.stdout + done.stderr


def test_triton_builds_and_loads_a_c_extension_as_any_user_under_a_read_only_root(image):
    # Triton's own build helper, its cache (TRITON_CACHE_DIR) and the import of what it built.
    script = """
from triton.runtime.build import compile_module_from_src
src = '''
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, methods};
PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&module); }
'''
print(compile_module_from_src(src, "probe").answer())
"""
    done = docker(
        "run",
        "--rm",
        "--read-only",
        "--network",
        "none",
        "--user",
        f"{OTHER_UID}:{OTHER_UID}",
        "--entrypoint",
        "python",
        image,
        "-c",
        script,
    )
    assert done.returncode == 0 and done.stdout.strip() == "42", done.stdout + done.stderr


def test_the_readme_publishes_what_the_dockerfile_adds_to_its_base(image):
    # Measured on the stand-in base, whose size is not the real one's: the layers of our own count.
    published = re.search(
        r"The\s+Dockerfile\s+adds\s+([\d.]+)\s+GB\s+to\s+its\s+base", (ROOT / "README.md").read_text()
    )
    assert published, "README.md's 'The image' publishes the size the Dockerfile adds"
    base = docker("image", "inspect", "-f", '{{index .Config.Labels "org.opencontainers.image.base.name"}}', image)
    sizes = [int(docker("image", "inspect", "-f", "{{.Size}}", name).stdout) for name in (image, base.stdout.strip())]
    assert (sizes[0] - sizes[1]) / 1e9 == pytest.approx(float(published[1]), rel=0.02)


# ---- the smoke recipe, as the README runs it


@pytest.mark.parametrize(
    "user",
    [
        pytest.param("as written", id="as-written"),
        pytest.param(1000, id="uid-1000"),
        pytest.param(OTHER_UID, id="any-uid"),
    ],
)
def test_the_readmes_smoke_line_trains_under_a_read_only_root(image, tmp_path, work, user):
    """As written (in CI the runner is root, so --user 0:0); as the image's own user (no --user);
    and as a user the image does not know, without a home or a passwd entry. Each owns the
    folder, as if it had run `mkdir -p outputs`; HOME and every cache must still be writable."""
    line = work(smoke_line())
    assert "--read-only" in line
    outputs = mkdir_outputs(tmp_path)
    if user != "as written":
        give_to(outputs, user)
        line = as_user(line, None if user == 1000 else user)
    owner = os.getuid() if user == "as written" else user

    try:
        done = sh(line, tmp_path)

        assert done.returncode == 0, done.stderr[-3000:]
        assert "done: smoke [single x1] 60 steps" in done.stdout
        out = outputs / "smoke"
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert {p.stat().st_uid for p in out.rglob("*")} == {owner}, "the run's files belong to the --user"
    finally:
        give_to(outputs, os.getuid())  # so that the test's folder can be removed


def test_the_smoke_line_writes_nothing_outside_the_volumes(image, tmp_path, work):
    """As the image's own user, on a writable root: any write outside the volumes would show in
    `docker diff` (under --read-only it would fail, or be skipped by a library that checks first)."""
    outputs = mkdir_outputs(tmp_path)
    give_to(outputs, 1000)
    name = f"unsloth-recipes-test-{uuid.uuid4().hex[:12]}"
    line = work(as_user(without(without(smoke_line(), "--rm"), "--read-only"), None))
    line = with_flags(line, "--name", name)
    try:
        done = sh(line, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert docker("diff", name).stdout == ""
    finally:
        docker("rm", "-v", "-f", name)
    assert (outputs / "smoke" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_process_ddp_on_the_cpu_trains_inside_the_container(image, tmp_path, work):
    outputs = mkdir_outputs(tmp_path)
    line = with_flags(work(smoke_line()), "-e CPU_PROCESSES=2") + " training.max_steps=20"

    done = sh(line, tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: smoke [ddp x2] 20 steps" in done.stdout
    m = metrics(outputs / "smoke")
    assert (m["mode"], m["world_size"]) == ("ddp", 2)


def test_a_vision_recipe_trains_and_generates_inside_the_container(image, tmp_path, work):
    """The tiny image-text model of tests/recipes/tiny-vision.yaml, its bundled images mounted: the
    image's own stack (its transformers, with torchvision) renders the chats, processes the images
    and trains; then answers a question about an image."""
    outputs = mkdir_outputs(tmp_path)
    tests = f"-v {ROOT / 'tests'}:/workspace/tests:ro"
    line = with_flags(work(smoke_line()), tests).removesuffix(" smoke")
    done = sh(f"{line} /workspace/tests/recipes/tiny-vision.yaml training.max_steps=10", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    m = metrics(outputs / "tiny-vision")
    assert (m["steps"], m["device"]) == (10, "cpu") and m["final_loss"] < m["first_loss"]
    question = "generate tiny-vision --prompt 'What colour?' --image /workspace/tests/data/vision/images/red.png"
    done = sh(f"{line} {question} --max-new-tokens 4", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_readmes_export_llama_cpp_and_generate_lines_work_on_a_finished_run(image, tmp_path, work):
    """After the smoke line (10 steps here): export to a merged model and GGUF files, quantized to
    q4_k_m by the image's llama.cpp, each checked against the trained model (the GGUF files by the
    image's llama-perplexity and llama-completion); llama.cpp then loads a file and generates; then
    generate."""
    outputs = mkdir_outputs(tmp_path)
    assert sh(work(smoke_line()) + " training.max_steps=10", tmp_path).returncode == 0
    export = readme_command("docker run", lambda c: f" {IMAGE} export " in c, "export")
    done = sh(work(export), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = outputs / "smoke"
    assert (run / "merged_16bit" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "gguf").iterdir()) == ["smoke-q4_k_m.gguf", "smoke-q8_0.gguf"]
    checks = {Path(r["path"]).name: r["check"] for r in json.loads((run / "exports.json").read_text())}
    assert sorted(checks) == ["merged_16bit", "smoke-q4_k_m.gguf", "smoke-q8_0.gguf"]
    for name, check in checks.items():
        assert check["ok"] is True and check["prompts_rendered_as_trained"] == "4/4", (name, check)
    assert all(checks[f"smoke-{q}.gguf"]["scored_by"] == "llama.cpp" for q in ("q8_0", "q4_k_m"))

    llama = readme_command("docker run", lambda c: "llama-simple" in c, "llama.cpp")
    done = sh(llama, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Q4_K - Medium" in done.stderr, "llama.cpp loaded the q4_k_m file"
    assert re.search(r"eval time = .* / +[1-9]\d* runs", done.stderr), "and generated tokens with it"

    generate = readme_command("docker run", lambda c: f" {IMAGE} generate " in c, "generate")
    done = sh(work(generate), tmp_path)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]


# The image's llama.cpp converter, after the merged model's tokenizer is damaged (conftest.DAMAGE_TOKENIZER).
CONVERT_DAMAGED = """
import runpy
import sys
from pathlib import Path

reverse_ordinary_ids(Path(sys.argv[1]) / "tokenizer.json")
runpy.run_path("/opt/llama.cpp/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_parts() -> tuple[str, ...]:
    """What requirements/llama_cpp.py puts in the image's /opt/llama.cpp."""
    spec = importlib.util.spec_from_file_location("llama_cpp_pin", ROOT / "requirements" / "llama_cpp.py")
    assert spec is not None and spec.loader is not None
    pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin)
    return (*pin.PYTHON_PARTS, *pin.TARGETS)


def test_a_gguf_whose_tokenizer_is_damaged_before_conversion_fails_its_check_with_exit_1(image, tmp_path, work):
    """The README's export line with a llama.cpp folder that is the image's, but for a converter
    that first reverses the ids of the merged model's tokens: the GGUF file is written, and its check
    fails the export with exit 1 and one line naming the file and its figures."""
    outputs = mkdir_outputs(tmp_path)
    assert sh(work(smoke_line()) + " training.max_steps=10", tmp_path).returncode == 0
    damaging = tmp_path / "damaging-llama.cpp"
    damaging.mkdir()
    for part in llama_cpp_parts():
        if part != "convert_hf_to_gguf.py":
            (damaging / part).symlink_to(f"/opt/llama.cpp/{part}")  # a path inside the container
    (damaging / "convert_hf_to_gguf.py").write_text(DAMAGE_TOKENIZER + CONVERT_DAMAGED)
    export = work(readme_command("docker run", lambda c: f" {IMAGE} export " in c, "export"))
    assert "--to merged_16bit gguf:q8_0,q4_k_m" in export
    mount = f"-v {damaging}:/workspace/damaging:ro"
    export = with_flags(export, mount, "-e UNSLOTH_LLAMA_CPP_PATH=/workspace/damaging")
    done = sh(export.replace("--to merged_16bit gguf:q8_0,q4_k_m", "--to gguf:q8_0"), tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    (failed,) = [line for line in done.stderr.splitlines() if line.startswith("export check failed:")]
    assert failed.startswith("export check failed: gguf smoke-q8_0.gguf: perplexity "), failed
    assert "Traceback" not in done.stderr and (outputs / "smoke" / "gguf" / "smoke-q8_0.gguf").is_file()


def steps_logged(container: str) -> int:
    """Training steps the container has logged so far (logging.steps=1): a fixed sleep would stop
    it before its first step on a busy machine."""
    logs = docker("logs", container)
    return (logs.stdout + logs.stderr).count("{'loss'")


def test_docker_stop_mid_training_checkpoints_exits_143_and_the_next_run_resumes(image, tmp_path, work):
    outputs = mkdir_outputs(tmp_path)
    name = f"unsloth-recipes-test-{uuid.uuid4().hex[:12]}"
    detached = with_flags(without(work(smoke_line()), "--rm"), "-d", "--name", name)
    started = sh(f"{detached} training.max_steps=20000 logging.steps=1", tmp_path)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 300
        while steps_logged(name) < 3:
            assert docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true", "it ended early"
            assert time.monotonic() < deadline, "no 3 training steps within 300 s"
            time.sleep(1)
        sent = time.monotonic()
        assert docker("stop", "-t", str(GRACE_S), name, timeout=GRACE_S + 30).returncode == 0
        assert time.monotonic() - sent < GRACE_S, "docker stop had to kill it"
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "143"
    finally:
        docker("rm", "-v", "-f", name)
    out = outputs / "smoke"
    stopped = metrics(out)
    assert stopped["interrupted"] == "SIGTERM" and stopped["steps"] > 0
    checkpoint = stopped["checkpoint"]
    assert (out / "checkpoints" / Path(checkpoint).name).is_dir()

    step = stopped["steps"]
    again = sh(f"{work(smoke_line())} training.max_steps={step + 5} logging.steps=5", tmp_path)

    assert again.returncode == 0, again.stderr[-3000:]
    resumed = metrics(out)
    assert resumed["resumed_from"] == checkpoint and resumed["steps"] == step + 5


def test_doctor_in_the_image_reports_the_stack_and_the_missing_gpu(image, tmp_path):
    line = readme_command("docker run", lambda c: c.endswith(f" {IMAGE} doctor"), "doctor")
    done = sh(without(line, "--gpus all"), tmp_path)  # no GPU here: what a forgotten --gpus all shows
    assert done.returncode == 0, done.stderr
    torch = re.search(r"^torch==(\S+)", (ROOT / "requirements" / "image.lock").read_text(), re.M)[1]
    assert f"torch {torch}" in done.stdout and "none visible" in done.stdout
    assert "docker run --gpus all" in done.stdout


# ---- the GPU lines, planned


@pytest.mark.parametrize("recipe", ["llama-3.1-8b-qlora-chat", "/workspace/recipes/my.yaml"])
def test_the_readmes_gpu_lines_plan_data_parallel_under_a_read_only_root(image, tmp_path, work, recipe):
    """Without --gpus all and offline, as `plan --assume-gpus 4x80` (see the module's docstring):
    both models fit one GPU, so data parallel over the four."""
    (tmp_path / "my.yaml").write_text(
        "model: {name: unsloth/Llama-3.2-3B-Instruct, max_seq_length: 2048}\n"
        "data: {source: yahma/alpaca-cleaned, format: instruction}\n"
    )
    mkdir_outputs(tmp_path)
    line = plan_instead(work(gpu_line(recipe)))
    assert "--read-only" in line

    done = sh(line, tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^mode\s+ddp:", done.stdout, re.M) and "processes   4 on GPUs 0,1,2,3" in done.stdout
    assert "PYTHONPATH=/app " in done.stdout, "the project is on the child's path once"


# ---- bad input inside the container: one error line, exit 2, nothing written


def test_an_outputs_folder_docker_created_as_root_is_refused_naming_the_uid_and_the_fix(image, tmp_path, work):
    # The README's line without its `mkdir -p outputs` and --user: Docker creates outputs/ for
    # root, and the image's UID 1000 cannot write it.
    done = sh(as_user(work(smoke_line()), None), tmp_path)
    error = one_error_line(done)
    assert "'/workspace/outputs/smoke' cannot be written by UID 1000" in error
    assert '--user "$(id -u):$(id -g)"' in error and "mkdir -p outputs" in error
    assert list((tmp_path / "outputs").iterdir()) == []


def test_a_cache_volume_of_another_user_is_refused_naming_its_owner(image, tmp_path, work):
    """The smoke line as UID 1000 fills the cache volume with folders of its own; the same line as
    another user is refused before anything starts, instead of failing when a cache is written."""
    outputs = mkdir_outputs(tmp_path)
    give_to(outputs, 1000)
    try:
        first = sh(work(as_user(smoke_line(), None)) + " training.max_steps=2", tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        give_to(outputs, OTHER_UID)
        done = sh(work(as_user(smoke_line(), OTHER_UID)), tmp_path)
        message = one_error_line(done)
        assert f"cannot be written by UID {OTHER_UID}: it belongs to UID 1000" in message
        assert "docker run --user 1000" in message and "a new volume on /workspace/cache" in message
    finally:
        give_to(outputs, os.getuid())


def test_a_gpu_line_without_gpus_is_refused_asking_for_gpus_all(image, tmp_path, work):
    outputs = mkdir_outputs(tmp_path)
    line = without_gpus(work(gpu_line("llama-3.1-8b-qlora-chat")))
    error = one_error_line(sh(line, tmp_path))
    assert "NUM_GPUS=4" in error and "visible" in error and "--gpus all" in error
    assert list(outputs.iterdir()) == []


def test_a_bad_variable_is_refused_naming_the_value_and_the_fix(image, tmp_path, work):
    outputs = mkdir_outputs(tmp_path)
    line = work(gpu_line("llama-3.1-8b-qlora-chat")).replace("-e NUM_GPUS=4", "-e NUM_GPUS=two")
    error = one_error_line(sh(without_gpus(line), tmp_path))
    assert "NUM_GPUS='two'" in error and "NUM_GPUS=2" in error
    assert list(outputs.iterdir()) == []


# ---- docker compose


@dataclasses.dataclass
class Compose:
    """A folder with the compose file and recipes-local/, as a checkout has them, and a project
    name of its own: its volumes are new, and removed afterwards."""

    folder: Path
    project: str

    def env(self) -> dict[str, str]:
        return {**environment(), "COMPOSE_PROJECT_NAME": self.project}

    def sh(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return sh(command, self.folder, timeout=timeout, COMPOSE_PROJECT_NAME=self.project)


@pytest.fixture
def compose(image: str, tmp_path: Path) -> Iterator[Compose]:
    (tmp_path / "docker-compose.yml").write_text((ROOT / "docker-compose.yml").read_text())
    (tmp_path / "recipes-local").mkdir()
    project = Compose(tmp_path, f"unsloth-recipes-test-{uuid.uuid4().hex[:12]}")
    yield project
    project.sh('docker compose --profile "*" down --volumes --remove-orphans')  # every profile's containers


def compose_line(matches: Callable[[str], bool], what: str) -> str:
    return readme_command("docker compose", matches, what)


def test_a_first_compose_up_trains_the_smoke_recipe_on_any_host_and_the_run_copies_out(compose):
    up = compose_line(lambda c: c == "docker compose up --exit-code-from cpu", "cpu up")
    done = compose.sh(up)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "done: smoke [single x1] 60 steps" in done.stdout

    copy = compose_line(lambda c: " docker compose cp " in c, "cp")
    assert compose.sh(copy).returncode == 0
    target = compose.folder / shlex.split(copy)[-1]
    assert metrics(target)["steps"] == 60 and (target / "adapter" / "adapter_model.safetensors").is_file()


def test_compose_up_exits_with_the_trainings_failure(compose):
    # `docker compose up` alone exits 0 when the container failed; the README's line reports it.
    up = compose_line(lambda c: c == "docker compose up --exit-code-from cpu", "cpu up")
    done = compose.sh(f"RECIPE=llama-3.1-8b-qlora-chat {up}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: no GPU is visible and recipe llama-3.1-8b-qlora-chat is meant for a GPU" in done.stderr


def test_the_readmes_gpu_compose_line_resolves_to_a_gpu_reservation_with_its_variables(compose):
    line = compose_line(lambda c: "--profile gpu" in c, "gpu")
    assignments, _, command = line.partition(" docker compose ")
    assert command.endswith("up --exit-code-from gpu gpu"), line
    config = compose.sh(f"{assignments} docker compose --profile gpu config --format json")
    assert config.returncode == 0, config.stderr
    services = json.loads(config.stdout)["services"]
    gpu, cpu = services["gpu"], services["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", -1, ["gpu"])
    assert gpu["command"] == ["qwen3-8b-qlora-chat"] and gpu["environment"]["PARALLELISM"] == "ddp"
    assert "deploy" not in cpu, "the default service must start on a host without GPUs"


def test_compose_serves_tensorboard_from_the_outputs_volume(compose):
    line = compose_line(lambda c: "--profile tensorboard" in c, "tensorboard")
    server = subprocess.Popen(
        ["bash", "-c", line],
        cwd=compose.folder,
        env=compose.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "TensorBoard did not answer within 120 s"
            try:
                with urllib.request.urlopen("http://127.0.0.1:6006/", timeout=5) as page:
                    assert page.status == 200 and b"TensorBoard" in page.read()
                    break
            except OSError:
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---- Kubernetes: the push


def test_the_readmes_push_names_the_image_the_kubernetes_pods_run(image, tmp_path):
    """`docker tag` runs; `docker push` cannot (no registry here): it must push what was tagged,
    the name deploy/kubernetes/image/kustomization.yaml gives every pod."""
    tag = readme_command("Kubernetes", lambda c: c.startswith("docker tag"), "tag")
    push = readme_command("Kubernetes", lambda c: c.startswith("docker push"), "push")
    source, reference = shlex.split(tag)[2:]
    assert source == image and shlex.split(push)[2:] == [reference]
    (entry,) = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "image" / "kustomization.yaml").read_text())["images"]
    assert reference == f"{entry['newName']}:{entry['newTag']}" and entry["name"] == image
    try:
        assert sh(tag, tmp_path).returncode == 0
        assert (
            docker("image", "inspect", "-f", "{{.Id}}", reference).stdout
            == docker("image", "inspect", "-f", "{{.Id}}", image).stdout
        )
    finally:
        docker("rmi", reference)
