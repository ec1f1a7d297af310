"""Vision SFT trains on the CPU: a tiny random-init Gemma 3 image-text model (built offline) on
bundled images, its loss falling, in one process and in two-process DDP (gloo), with LoRA on the
parts the recipe chooses. On the CPU, where Unsloth's backend has no vision models, transformers and
PEFT load the model with the LoRA targets Unsloth's get_peft_regex picks; on a GPU Unsloth's
FastVisionModel and its vision collator do (trainer/models.py, trainer/methods.py), wired here as
Unsloth's API takes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import VISION_RECIPE, adapter_keys, clean_env, run_cli

from recipes import catalog
from recipes.runs import Run

HUB_RECIPES = ("qwen2.5-vl-7b-vision-sft", "gemma-3-4b-vision-sft")


# ---- training on the CPU


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "outputs" / "tiny-vision" / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_tiny_vision_model_trains_on_bundled_images_and_its_loss_falls(tmp_path, processes):
    done = run_cli("run", str(VISION_RECIPE), cwd=tmp_path, env=clean_env(CPU_PROCESSES=processes))
    assert done.returncode == 0, done.stderr[-3000:]
    m = metrics_of(tmp_path)
    assert (m["steps"], m["world_size"]) == (30, int(processes))
    assert m["final_loss"] < m["first_loss"] and m["tokens"] > 0
    assert [s for s, _ in m["eval_losses"]] == [0, 15, 30] and m["eval_losses"][-1][1] < m["eval_losses"][0][1]
    assert len(m["trainable_fingerprints"]) == int(processes) and len(set(m["trainable_fingerprints"])) == 1
    keys = adapter_keys(tmp_path)
    assert any(".vision_tower." in k for k in keys) and any(".language_model." in k for k in keys)
    assert (tmp_path / "outputs" / "tiny-vision" / "adapter" / "processor_config.json").is_file()


@pytest.mark.e2e
def test_lora_leaves_the_vision_tower_alone_when_the_recipe_says_so(language_only_run):
    keys = adapter_keys(language_only_run)
    assert keys and not any(".vision_tower." in k for k in keys)
    assert all(".language_model." in k for k in keys)


# ---- the GPU path, wired as Unsloth's API takes it (no GPU here: Unsloth's classes stand in)


def parameters_of(module_file: str, cls: str, function: str) -> set[str]:
    """The parameter names of an Unsloth method, from its source file (not imported)."""
    import ast
    import importlib.util

    origin = importlib.util.find_spec("unsloth").origin
    tree = ast.parse((Path(origin).parent / module_file).read_text())
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    method = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return {a.arg for a in method.args.posonlyargs + method.args.args + method.args.kwonlyargs}


def test_on_a_gpu_fast_vision_model_loads_it_and_lora_takes_the_recipes_parts(monkeypatch):
    import torch
    import unsloth

    from trainer import models

    calls: dict[str, dict] = {}

    class Recorder:
        @staticmethod
        def from_pretrained(**kwargs):
            calls["load"] = kwargs
            return "model", "processor"

        @staticmethod
        def get_peft_model(model, **kwargs):
            calls["peft"] = kwargs
            return "model with LoRA"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(unsloth, "FastVisionModel", Recorder)
    recipe = catalog.load("gemma-3-4b-vision-sft").recipe
    assert models.load(recipe, "unsloth/gemma-3-4b-it", {"": 0}) == ("model with LoRA", "processor")
    assert (calls["load"]["load_in_4bit"], calls["load"]["device_map"]) == (True, {"": 0})
    peft = calls["peft"]
    assert (peft["finetune_vision_layers"], peft["finetune_language_layers"]) == (False, True)
    assert peft["target_modules"] is None, "every linear layer of the chosen parts"
    # Every keyword is one that Unsloth's GPU functions take (read from their source: importing
    # Unsloth's GPU modules here would patch transformers for the tests after this one).
    assert set(calls["load"]) <= parameters_of("models/loader.py", "FastModel", "from_pretrained")
    assert set(peft) <= parameters_of("models/vision.py", "FastBaseModel", "get_peft_model")


def test_on_a_gpu_unsloths_vision_collator_renders_the_chats(monkeypatch):
    import sys

    import torch
    import trl
    import unsloth  # noqa: F401  (installs unsloth.trainer)

    from trainer import methods

    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys.modules["unsloth.trainer"], "UnslothVisionDataCollator", lambda *a: made.append(a) or a)
    assert methods.vision_collator("model", "processor") == ("model", "processor") and made
    recipe = catalog.load(HUB_RECIPES[0]).recipe
    config = trl.SFTConfig(output_dir="/tmp/unused", **methods.supervised_options(recipe))
    assert config.dataset_kwargs == {"skip_prepare_dataset": True} and config.remove_unused_columns is False
    assert methods.shared_arguments(Run(Path("/tmp/unused"), recipe), "bf16")["ddp_find_unused_parameters"] is False
