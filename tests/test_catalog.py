"""Recipes: finding them, overrides, and messages that name the field, the value and the fix."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, write_recipe

from recipes import catalog
from recipes.errors import BadInput

MINIMAL = """
model:
  name: unsloth/Llama-3.2-1B-Instruct
data:
  source: data.jsonl
  format: {fmt}
"""


def recipe_with_rows(tmp_path, fmt, rows):
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_recipe(tmp_path, "mine", MINIMAL.format(fmt=fmt))


def test_bundled_names_resolve_to_their_files():
    assert catalog.locate("smoke") == catalog.RECIPES_DIR / "smoke.yaml"


def test_unknown_recipe_suggests_the_closest_and_lists_the_bundled():
    with pytest.raises(BadInput, match=r"unknown recipe 'smok' \(did you mean 'smoke'\?\); bundled recipes: .*smoke"):
        catalog.locate("smok")


def test_missing_recipe_file_names_the_path(tmp_path):
    with pytest.raises(BadInput, match="recipe file '.*nope.yaml' does not exist"):
        catalog.locate(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(BadInput, match="is not valid YAML at line 3"):
        catalog.load(str(path))


def test_a_yaml_list_is_not_a_recipe(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(BadInput, match="must be a YAML mapping"):
        catalog.load(str(path))


def test_relative_data_path_resolves_next_to_the_recipe(tmp_path):
    path = recipe_with_rows(tmp_path, "text", [{"text": "hello"}])
    assert catalog.load(str(path)).recipe.data.source == str(tmp_path / "data.jsonl")


def test_name_defaults_to_the_file_stem(tmp_path):
    assert catalog.load(str(recipe_with_rows(tmp_path, "text", [{"text": "x"}]))).name == "mine"


def test_overrides_are_typed_by_the_schema():
    loaded = catalog.load("smoke", ["training.max_steps=7", "lora.r=4", "training.learning_rate=1e-3"])
    recipe = loaded.recipe
    assert (recipe.training.max_steps, recipe.lora.r, recipe.training.learning_rate) == (7, 4, 1e-3)


def test_override_can_set_a_list():
    recipe = catalog.load("smoke", ["lora.target_modules=[q_proj, v_proj]"]).recipe
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_override_key_suggests_the_closest():
    with pytest.raises(
        BadInput, match=r"unknown override key 'training.lerning_rate' \(did you mean 'training.learning_rate'\?\)"
    ):
        catalog.load("smoke", ["training.lerning_rate=1e-4"])


def test_override_without_equals_shows_the_form():
    with pytest.raises(BadInput, match="is not key=value; write it like training.max_steps=100"):
        catalog.load("smoke", ["training.max_steps"])


def test_override_with_a_wrong_type_names_field_and_value():
    with pytest.raises(BadInput, match=r"training.max_steps = 'many': Input should be a valid integer"):
        catalog.load("smoke", ["training.max_steps=many"])


def test_unknown_key_in_a_file_suggests_the_closest(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    path = write_recipe(tmp_path, "typo", MINIMAL.format(fmt="text") + "trainng:\n  max_steps: 3\n")
    with pytest.raises(BadInput, match=r"unknown key 'trainng' \(did you mean 'training'\?\)"):
        catalog.load(str(path))


def test_missing_required_section_is_named(tmp_path):
    path = write_recipe(tmp_path, "nodata", "model:\n  name: x/y\n")
    with pytest.raises(BadInput, match="data is required but missing"):
        catalog.load(str(path))


def test_cross_field_rules_say_what_to_change():
    with pytest.raises(BadInput, match="full_finetuning trains every weight and needs load_in: 16bit"):
        catalog.load("smoke", ["model.full_finetuning=true", "model.load_in=4bit"])
    with pytest.raises(BadInput, match="training.method dpo needs data.format preference"):
        catalog.load("smoke", ["training.method=dpo"])


def test_a_method_gets_its_own_options_section_with_its_defaults():
    dpo = catalog.load(str(ROOT / "tests" / "recipes" / "tiny-dpo.yaml"), ["training.dpo.beta=0.25"]).recipe
    assert dpo.training.dpo is not None and dpo.training.dpo.beta == 0.25
    assert "dpo:\n    beta: 0.25" in catalog.to_yaml(dpo)
    sft = catalog.load("smoke").recipe
    assert sft.training.dpo is None and "dpo" not in catalog.to_yaml(sft)


def test_another_methods_options_are_refused_naming_the_method():
    with pytest.raises(BadInput, match="training.dpo holds options of training.method dpo, but the method is sft"):
        catalog.load("smoke", ["training.dpo.beta=0.2"])


def test_a_data_format_of_another_method_names_the_method_that_takes_it(tmp_path):
    path = recipe_with_rows(tmp_path, "preference", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(BadInput, match="not preference; data.format preference is for training.method dpo"):
        catalog.load(str(path))


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_moved_key_is_refused_naming_its_new_place(tmp_path, where):
    dpo = ROOT / "tests" / "recipes" / "tiny-dpo.yaml"
    if where == "file":
        old = write_recipe(tmp_path, "old", dpo.read_text().replace("  dpo:\n    beta: 0.1", "  dpo_beta: 0.1"))
        args: tuple[str, list[str]] = (str(old), [])
    else:
        args = (str(dpo), ["training.dpo_beta=0.2"])
    with pytest.raises(BadInput, match=r"training.dpo_beta \(.*\) moved to training.dpo.beta; write it there"):
        catalog.load(*args)


def test_a_row_that_does_not_match_the_format_is_named_with_its_field(tmp_path):
    path = recipe_with_rows(tmp_path, "instruction", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(
        BadInput, match=r"data.jsonl row 2 has no field 'output', so it does not match data.format instruction"
    ):
        catalog.load(str(path))


def test_a_chat_without_an_assistant_turn_is_refused(tmp_path):
    path = recipe_with_rows(tmp_path, "messages", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BadInput, match="row 1 field .messages. has no assistant turn"):
        catalog.load(str(path))


def test_a_message_with_an_unknown_role_is_refused(tmp_path):
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(BadInput, match=r"messages\[0\].role is 'human'"):
        catalog.load(str(recipe_with_rows(tmp_path, "messages", rows)))


def test_invalid_json_line_is_named(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    path = write_recipe(tmp_path, "mine", MINIMAL.format(fmt="text"))
    with pytest.raises(BadInput, match="row 2 is not valid JSON"):
        catalog.load(str(path))


def test_missing_local_data_file_is_refused(tmp_path):
    path = write_recipe(tmp_path, "mine", MINIMAL.format(fmt="text"))
    with pytest.raises(BadInput, match="data.source 'data.jsonl' does not exist"):
        catalog.load(str(path))


def test_a_hub_dataset_id_is_validated_not_downloaded(tmp_path):
    path = write_recipe(tmp_path, "hub", MINIMAL.replace("data.jsonl", "someorg/chats").format(fmt="messages"))
    assert catalog.load(str(path)).recipe.data.source == "someorg/chats"


def test_resolved_recipe_round_trips_through_yaml(tmp_path):
    loaded = catalog.load("smoke", ["training.max_steps=3"])
    copy = tmp_path / "copy.yaml"
    copy.write_text(catalog.to_yaml(loaded.recipe))
    assert catalog.load(str(copy)).recipe == loaded.recipe


@pytest.mark.parametrize("name", sorted(catalog.bundled()))
def test_every_bundled_recipe_validates_and_gives_its_launch_line(name):
    loaded = catalog.load(name)
    header = loaded.path.read_text().split("\n\n")[0]
    assert header.startswith("# ") and "docker run" in header and name in header
    if loaded.recipe.model.random_init is None:
        sources = [s.source for s in loaded.recipe.data.datasets]
        assert "/" in loaded.recipe.model.name and all("/" in s for s in sources)  # hub ids, not fetched


def test_the_collection_covers_the_methods_and_a_model_parallel_recipe():
    recipes = [catalog.load(name).recipe for name in catalog.bundled()]
    assert len(recipes) >= 9
    from recipes.methods import METHODS

    assert {r.training.method for r in recipes} == set(METHODS), "every method has a bundled recipe"
    assert any("70B" in r.model.name for r in recipes)
