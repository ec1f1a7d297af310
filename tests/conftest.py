"""Shared helpers: a clean launcher environment, recipe files, and the CLI as a subprocess."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import settings

# The test command's verdict must not depend on chance: property tests replay the same examples
# every run, and no example has a deadline (a busy machine is slow, not wrong). To explore new
# examples on purpose: HYPOTHESIS_PROFILE=explore make test.
settings.register_profile("replay", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replay"))

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER_VARIABLES = (
    "PARALLELISM",
    "NUM_GPUS",
    "CPU_PROCESSES",
    "ALLOW_CPU",
    "RECIPE",
    "OUTPUTS_DIR",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "WORLD_SIZE",
    "RANK",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
)

# config.json of Llama 3.1 8B, as the hub serves it (the fields the memory planner reads).
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}

BIG_RECIPE = """
model:
  name: meta-llama/Llama-3.3-70B-Instruct
  load_in: 16bit
  max_seq_length: 2048
data:
  source: someorg/some-chats
  format: messages
training:
  per_device_batch_size: 1
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["HF_HUB_OFFLINE"] = "1"  # tests never reach the network; test_hub.py stands in for the hub
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    full_env = clean_env() if env is None else env
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "entrypoint", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_training_program(cwd: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m trainer` on the smoke recipe, as a launcher would start it, outputs in cwd/o."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", "--recipe", "smoke", "--mode", mode, f"output.dir={cwd}/o"],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(ROOT), **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def plan_for(env: dict[str, str], loaded, inventory: list, cwd: str = "/work", python: str = "python"):
    """What the launcher plans for this environment on a host with these GPUs: the host's other
    facts (model config, llama.cpp) are gathered from `env` as the CLI does, never from the network."""
    from entrypoint import environment, host, plan

    facts = dataclasses.replace(host.gather(env, loaded.recipe, cwd, python=python, ask_hub=False), gpus=inventory)
    return plan.make(environment.read(env), loaded, facts)


def readme_commands(heading: str) -> list[str]:
    """The commands of the bash blocks under README.md's `### heading`: continuation lines joined,
    comments dropped."""
    section = (ROOT / "README.md").read_text().split(f"\n### {heading}\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


# A tokenizer damaged on purpose, for the export checks to catch: the ids of its ordinary (not added)
# tokens reversed in tokenizer.json, so the same text maps to other embedding rows, as a mismatched
# tokenizer's would. Python source, run inside the export's own process (test_export.py) or inside
# the image, before llama.cpp's converter (test_docker.py).
DAMAGE_TOKENIZER = """
import json


def reverse_ordinary_ids(path):
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    added = {token["id"] for token in tokenizer["added_tokens"]}
    ordinary = sorted(i for i in vocab.values() if i not in added)
    flipped = dict(zip(ordinary, reversed(ordinary)))
    tokenizer["model"]["vocab"] = {token: flipped.get(i, i) for token, i in vocab.items()}
    path.write_text(json.dumps(tokenizer))
"""


def processes_with(marker: str) -> list[int]:
    """Every live process (but this one) whose environment holds the marker: what a test started, the
    launcher's children and the ranks included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def write_recipe(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variable from the developer's shell leaks into a test."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def big_recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, "big", BIG_RECIPE)


VISION_RECIPE = ROOT / "tests" / "recipes" / "tiny-vision.yaml"


def adapter_keys(folder: Path) -> list[str]:
    """The tensors of the tiny vision run's adapter under `folder`."""
    from safetensors.torch import load_file

    return sorted(load_file(folder / "outputs" / "tiny-vision" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def language_only_run(tmp_path_factory) -> Path:
    """A short run of the tiny vision recipe whose LoRA leaves the vision tower alone
    (lora.finetune_vision_layers=false): the training, export and generate tests share it."""
    folder = tmp_path_factory.mktemp("language-only")
    overrides = ["lora.finetune_vision_layers=false", "data.eval_fraction=null"]
    done = run_cli("run", str(VISION_RECIPE), *overrides, "training.eval_steps=0", cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder
