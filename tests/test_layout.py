"""The layout holds: the launcher (entrypoint/) and the recipes (recipes/) never import the torch
stack, only the trainer (trainer/) does; nothing imports upward; no function grows past 80
lines; the modes and the environment contract are each said once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from entrypoint import environment
from recipes import modes

PACKAGES = ("entrypoint", "recipes", "trainer")
TORCH_STACK = ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo", "datasets")
MAX_FUNCTION_LINES = 80


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["entrypoint", "recipes"])
def test_the_launcher_and_the_recipes_never_import_the_torch_stack(package):
    for path in modules(package):
        assert not imported(path) & set(TORCH_STACK), f"{path.relative_to(ROOT)} imports the torch stack"


def test_importing_every_launcher_and_recipe_module_loads_no_torch_stack():
    names = [f"{p}.{m.stem}" for p in ("entrypoint", "recipes") for m in modules(p) if m.stem != "__main__"]
    imports = "; ".join(f"import {name}" for name in names)
    code = f"import sys; {imports}; print(sorted(set(sys.modules) & {set(TORCH_STACK)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_nothing_imports_upward():
    """recipes/ is below both programs; the launcher never imports the training program."""
    for path in modules("recipes"):
        assert not imported(path) & {"entrypoint", "trainer"}, path.name
    for path in modules("entrypoint"):
        assert "trainer" not in imported(path), path.name


def test_no_function_is_longer_than_80_lines():
    for package in PACKAGES:
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= MAX_FUNCTION_LINES, f"{path.relative_to(ROOT)}:{node.name} is {length} lines"


def test_every_mode_word_comes_from_the_mode_table():
    assert set(environment.PARALLELISM_ALIASES.values()) == {"auto", *modes.MODES}
    for name, spec in modes.SPECS.items():
        assert all(environment.PARALLELISM_ALIASES[word] == name for word in (name, *spec.aliases))


def test_readmes_environment_table_is_the_contract():
    readme = (ROOT / "README.md").read_text().splitlines()
    for variable in environment.CONTRACT:
        assert variable.markdown() in readme, f"README's row for {variable.name} differs from environment.CONTRACT"


def test_the_command_lines_help_is_the_contract():
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and environment.contract_help() in done.stdout


def test_every_method_a_recipe_can_name_has_its_trainer():
    from recipes.methods import METHODS
    from trainer.methods import TRAINERS

    assert set(TRAINERS) == set(METHODS)
