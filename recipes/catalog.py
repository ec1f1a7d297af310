"""Find, read, override and validate recipes. Pure Python + pydantic + PyYAML: no torch.

A recipe is named either by a bundled name (`smoke`, the file stem of a YAML file in this
folder) or by a path to the user's own YAML file. Overrides are `dotted.key=value` words;
the value is read as YAML (so `8`, `true`, `null`, `[q_proj, v_proj]` have their types) and
the result is validated by the schema like the file itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from recipes import formats, rewards
from recipes.errors import BadInput, closest, format_validation_error
from recipes.methods import METHODS, MOVED_KEYS
from recipes.schema import SAFE_NAME, DataConfig, DataSource, Recipe

RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sample:
    """The first rows of one local source, as the launcher checked them (its columns renamed): what
    validate and plan report on. A hub dataset's rows are read by the training program only."""

    section: str  # where the source sits in the recipe: data, or data.sources[N]
    source: str
    rows: list[Any]
    local: bool


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe  # validated; name filled in; local paths made absolute
    path: Path  # the YAML file it came from
    overrides: tuple[str, ...] = ()
    samples: tuple[Sample, ...] = ()  # each source's first rows, in the order of data.datasets

    @property
    def name(self) -> str:
        assert self.recipe.name is not None
        return self.recipe.name


def bundled() -> dict[str, Path]:
    """Bundled recipe names -> files, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def locate(name_or_path: str) -> Path:
    """A bundled name or a path to a YAML file -> the file; BadInput naming the choices otherwise."""
    known = bundled()
    if name_or_path in known:
        return known[name_or_path]
    path = Path(name_or_path).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or os.sep in name_or_path
    if path.is_file():
        return path
    names = ", ".join(known)
    if looks_like_path:
        raise BadInput(
            f"recipe file {name_or_path!r} does not exist; check the path (inside a container, "
            f"mount it with -v) or use a bundled recipe: {names}"
        )
    raise BadInput(
        f"unknown recipe {name_or_path!r}{closest(name_or_path, known)}; bundled recipes: "
        f"{names}; or give the path to your own YAML file"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read recipe file {str(path)!r}: {exc}; check the path and its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise BadInput(f"recipe file {str(path)!r} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if not isinstance(data, dict):
        raise BadInput(
            f"recipe file {str(path)!r} must be a YAML mapping with model:, data:, ... "
            f"but holds {type(data).__name__}; see recipes/smoke.yaml for the shape"
        )
    return data


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `X | None`, else None (a list of them, data.sources, is one value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, dict):
        return None
    for arg in get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def schema_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, list[str]]:
    """Each dotted section ('' = top level) -> the keys valid in it."""
    sections = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is not None:
            sections.update(schema_keys(sub, f"{prefix}.{name}" if prefix else name))
    return sections


def all_dotted_keys() -> list[str]:
    return [f"{section}.{key}" if section else key for section, keys in schema_keys().items() for key in keys]


def refuse_moved(key: str, where: str) -> None:
    if key in MOVED_KEYS:
        raise BadInput(
            f"{key} ({where}) moved to {MOVED_KEYS[key]}; write it there "
            f"(the override {MOVED_KEYS[key]}=VALUE, or that section in the recipe file)"
        )


def _moved_keys_in(raw: dict[str, Any], path: Path) -> None:
    for key in MOVED_KEYS:
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            refuse_moved(key, f"in {path}")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of raw with each `dotted.key=value` applied; BadInput on a bad override."""
    import copy

    result = copy.deepcopy(raw)
    sections = schema_keys()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"override {item!r} is not key=value; write it like training.max_steps=100")
        refuse_moved(key, "an override")
        section, _, leaf = key.rpartition(".")
        if section not in sections or leaf not in sections[section]:
            raise BadInput(
                f"unknown override key {key!r}{closest(key, all_dotted_keys())}; "
                f"'validate RECIPE' lists the resolved recipe with every key"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise BadInput(f"override {item!r}: the value {text!r} is not valid YAML; quote it") from None
        node = result
        for part in section.split(".") if section else []:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return result


def _absolute_if_local(value: str, base: Path) -> str:
    """A relative path that exists next to the recipe (or in the working directory) -> absolute."""
    candidate = Path(value).expanduser()
    for path in (candidate, base / candidate) if not candidate.is_absolute() else (candidate,):
        if path.exists():
            return str(path.resolve())
    return value


def _local_data(value: str, field: str, base: Path, recipe_file: Path, must_be_local: bool = False) -> str:
    """A data path made absolute (next to the recipe, or in the working directory); BadInput when
    it looks local, or must be, and is not there."""
    found = _absolute_if_local(value, base)
    if (must_be_local or formats.looks_local(found)) and not Path(found).exists():
        raise BadInput(
            f"{field} {value!r} does not exist (looked next to {str(recipe_file)!r} and in "
            f"{os.getcwd()!r}); fix the path, mount the file, or name a hub dataset like org/name"
        )
    return found


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), rows: bool = True) -> LoadedRecipe:
    """The recipe, validated, its local paths made absolute; with `rows`, the first rows of its local
    data checked too (every process but the one that prepares the data leaves them to it)."""
    path = locate(name_or_path)
    raw = read_yaml(path)
    _moved_keys_in(raw, path)
    raw = apply_overrides(raw, overrides)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(format_validation_error(exc, str(path), schema_keys())) from None
    base = path.resolve().parent
    updates: dict[str, Any] = {}
    if recipe.name is None:
        if not re.match(SAFE_NAME, path.stem):
            raise BadInput(
                f"recipe file name {path.name!r} is not usable as a run name (letters, digits, '.', '_', '-'); "
                f"rename the file or set name: in it"
            )
        updates["name"] = path.stem
    model_name = recipe.model.name if recipe.model.random_init else _absolute_if_local(recipe.model.name, base)
    recipe = recipe.model_copy(
        update={
            **updates,
            "data": _with_local_paths(recipe.data, base, path),
            "model": recipe.model.model_copy(update={"name": model_name}),
        }
    )
    samples = tuple(_check_local_rows(recipe.data)) if rows else ()
    grpo = recipe.training.grpo
    if grpo is not None:
        reward_file = grpo.reward_file and _absolute_if_local(grpo.reward_file, base)
        rewards.check(grpo.rewards, reward_file)
        if reward_file != grpo.reward_file:
            grpo = grpo.model_copy(update={"reward_file": reward_file})
            recipe = recipe.model_copy(update={"training": recipe.training.model_copy(update={"grpo": grpo})})
    return LoadedRecipe(recipe=recipe, path=path, overrides=tuple(overrides), samples=samples)


def _local_paths(source: DataSource, section: str, base: Path, recipe_file: Path) -> dict[str, Any]:
    """A source's local paths made absolute (source, and eval_split where the data is local)."""
    found = _local_data(source.source, f"{section}.source", base, recipe_file)
    local = Path(found).exists()
    eval_split = source.eval_split
    if eval_split is not None and (local or formats.looks_local(eval_split)):
        # With local training data, the evaluation rows are local too: a file or folder, not a split name.
        eval_split = _local_data(eval_split, f"{section}.eval_split", base, recipe_file, must_be_local=local)
    return {"source": found, "eval_split": eval_split}


def _with_local_paths(data: DataConfig, base: Path, recipe_file: Path) -> DataConfig:
    if data.sources is None:
        return data.model_copy(update=_local_paths(data.datasets[0], "data", base, recipe_file))
    sources = [
        s.model_copy(update=_local_paths(s, data.section(i), base, recipe_file)) for i, s in enumerate(data.sources)
    ]
    return data.model_copy(update={"sources": sources})


def _check_local_rows(data: DataConfig) -> Iterator[Sample]:
    """Check the first rows of every local file of every source (and its evaluation rows): a bad row
    is refused before anything starts. Yields each training source's rows, for the data report."""
    for index, source in enumerate(data.datasets):
        section = data.section(index)
        local = Path(source.source).exists()
        checked: list[Any] = []
        for field, value in ((f"{section}.source", source.source), (f"{section}.eval_split", source.eval_split)):
            if value is not None and Path(value).exists():
                rows = formats.check_local_file(
                    Path(value), source.format, field, source.columns, source.layout, section
                )
                checked = checked or rows
        yield Sample(section, source.source, checked, local)


def to_yaml(recipe: Recipe) -> str:
    data = recipe.model_dump(mode="json")
    for name in METHODS:  # only the method in use has its options section
        if data["training"].get(name, "") is None:
            del data["training"][name]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
