"""Vision SFT (`data.format: vision`), before anything trains: what a row must hold, how it is shaped
for the trainer, what is refused before anything loads, and the plan of the bundled recipes.
Training: test_vision_training.py; the exports and generate: test_vision_export.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, plan_for, run_cli

from entrypoint import gpus, memory
from recipes import catalog, formats
from recipes.errors import BadInput

TINY = ROOT / "tests" / "recipes" / "tiny-vision.yaml"
DATA = ROOT / "tests" / "data" / "vision"
HUB_RECIPES = ("qwen2.5-vl-7b-vision-sft", "gemma-3-4b-vision-sft")


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


IMAGE, TEXT = {"type": "image"}, {"type": "text", "text": "What colour?"}
ANSWER = {"role": "assistant", "content": "red"}


# ---- what a row holds


def test_a_chat_with_image_parts_and_as_many_images_is_a_vision_row():
    assert formats.row_problem({"messages": [user(IMAGE, TEXT), ANSWER], "images": ["a.png"]}, "vision") is None


def test_a_chat_of_plain_text_contents_takes_its_images_before_the_first_user_text():
    assert (
        formats.row_problem({"messages": [{"role": "user", "content": "Hi"}, ANSWER], "images": ["a.png"]}, "vision")
        is None
    )


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": [user(IMAGE, TEXT), ANSWER]}, "field 'images' is missing"),
        ({"messages": [user(IMAGE, TEXT), ANSWER], "images": []}, "field 'images' is missing"),
        ({"messages": [user(IMAGE, IMAGE, TEXT), ANSWER], "images": ["a.png"]}, "2 image parts in its messages but 1"),
        ({"messages": [user({"type": "audio"}), ANSWER], "images": ["a.png"]}, r"content\[0\] is not a text part"),
        ({"messages": [user(IMAGE, TEXT)], "images": ["a.png"]}, "no assistant turn"),
        ({"messages": [user(IMAGE, TEXT), ANSWER], "images": [3]}, r"images\[0\] is int, not an image path"),
        ({"messages": [user(IMAGE, TEXT), ANSWER], "images": [{"bytes": None}]}, r"images\[0\] is dict, not an image"),
    ],
)
def test_a_vision_row_that_does_not_fit_is_named_with_its_problem(row, problem):
    with pytest.raises(BadInput, match=problem):
        formats.check_row(row, "vision", "row 1")


def test_image_parts_are_text_contents_only_in_vision_rows():
    assert "has no text field 'content'" in formats.row_problem({"messages": [user(TEXT), ANSWER]}, "messages")


# ---- shaped for the trainer


def vision_data(source: str):
    from recipes.schema import DataConfig

    return DataConfig(source=source, format="vision")


def test_images_go_before_the_first_user_text_when_the_chat_has_no_image_parts():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, ANSWER],
           "images": ["images/red.png", "images/blue.png"]}  # fmt: skip
    shaped = formats.shape_row(row, "vision", vision_data(str(DATA / "colours.jsonl")))
    assert [p["type"] for p in shaped["messages"][1]["content"]] == ["image", "image", "text"]
    assert shaped["messages"][0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert shaped["images"] == [str(DATA / "images" / "red.png"), str(DATA / "images" / "blue.png")]


def test_a_chat_with_image_parts_keeps_them_where_they_are():

    row = {"messages": [user(TEXT, IMAGE), ANSWER], "images": ["images/red.png"]}
    shaped = formats.shape_row(row, "vision", vision_data(str(DATA)))
    assert [p["type"] for p in shaped["messages"][0]["content"]] == ["text", "image"]
    assert shaped["images"] == [str(DATA / "images" / "red.png")]  # a folder source: relative to it


def checked_and_shaped(hub, name: str):
    """The data phase on a hub dataset's rows, decoded as the trainer reads them."""
    from recipes.schema import DataSource
    from trainer import data

    source = DataSource(source=name, format="vision")
    return data.with_images(data.checked_and_shaped(hub, source, vision_data(name), "data.source", name, "data"))


def test_a_hub_vision_dataset_is_checked_and_shaped_without_decoding_its_images():
    """As HuggingFaceH4/llava-instruct-mix-vsft comes: parts with an index and None texts, a list of
    datasets Images."""
    import datasets
    from PIL import Image

    from trainer import data

    parts = [{"index": 0, "text": None, "type": "image"}, {"index": None, "text": "What colour?", "type": "text"}]
    rows = {
        "messages": [[{"role": "user", "content": parts}, {"role": "assistant", "content": [
            {"index": None, "text": "Red.", "type": "text"}]}]] * 3,
        "images": [[Image.open(DATA / "images" / "red.png")]] * 3,
    }  # fmt: skip
    hub = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    assert isinstance(data.undecoded(hub)[0]["images"][0], dict), "checked and shaped as bytes"
    shaped = checked_and_shaped(hub, "org/a-hub-dataset")
    first = shaped[0]
    assert first["images"][0].size == (24, 24), "decoded again for the collator"
    assert [p["type"] for p in first["messages"][0]["content"]] == ["image", "text"]
    assert [(p["type"], p["text"]) for p in first["messages"][1]["content"]] == [("text", "Red.")]


def test_a_hub_dataset_with_one_image_column_trains_as_one_image_per_chat():
    import datasets
    from PIL import Image

    rows = {
        "messages": [[{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}]] * 2,
        "image": [Image.open(DATA / "images" / "red.png")] * 2,
    }
    hub = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    shaped = checked_and_shaped(hub, "org/one-image")
    assert [image.size for image in shaped[0]["images"]] == [(24, 24)]
    assert [p["type"] for p in shaped[0]["messages"][0]["content"]] == ["image", "text"]


# ---- refused before anything loads


def copy_data(tmp_path: Path) -> Path:
    shutil.copytree(DATA, tmp_path / "vision")
    return tmp_path / "vision" / "colours.jsonl"


def test_a_missing_image_file_stops_the_run_before_anything_is_written(tmp_path):
    data = copy_data(tmp_path)
    (tmp_path / "vision" / "images" / "blue.png").unlink()
    done = run_cli("run", str(TINY), f"data.source={data}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: data.source ") and "images[0] 'images/blue.png' is not a file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.random_init.architecture=llama"], "images need a vision-language model; set model.random_init"),
        (["training.packing=true"], "set training.packing=false for data.format vision"),
        (["data.chat_template=chatml"], "renders chats with its processor's own template"),
        (["lora.finetune_vision_layers=false", "lora.finetune_language_layers=false"], "nothing would train"),
        (["lora.finetune_attention_modules=false", "lora.finetune_mlp_modules=false"], "nothing would train"),
        (["data.train_on_responses_only=true"], "set data.train_on_responses_only=false"),
        (["output.save=[adapter,gguf]"], "the GGUF export of a vision model .* is not built yet"),
    ],
)
def test_an_impossible_vision_recipe_is_refused_naming_the_field_and_the_fix(overrides, message):
    with pytest.raises(BadInput, match=message):
        catalog.load(str(TINY), overrides)


def test_choosing_vision_parts_of_a_text_recipe_is_refused():
    with pytest.raises(BadInput, match="lora.finetune_vision_layers=false chooses the parts of a vision-language"):
        catalog.load("smoke", ["lora.finetune_vision_layers=false"])


def test_a_random_init_vision_model_trains_on_images_only():
    with pytest.raises(BadInput, match="a vision-language model trains on images here; set data.format=vision"):
        catalog.load("smoke", ["model.random_init.architecture=gemma3-vision"])


def test_a_config_names_its_vision_tower_under_many_keys():
    assert memory.takes_images({"vision_config": {"model_type": "idefics3_vision"}})  # sizes left to defaults
    assert memory.takes_images({"img_processor": {"name": "clip_vision_model"}})  # Phi-3.5-vision
    assert not memory.takes_images({"hidden_size": 64, "num_hidden_layers": 2, "text_config": {}})


def test_images_for_a_model_whose_config_has_no_vision_tower_are_refused(tmp_path):
    model = tmp_path / "text-model"
    model.mkdir()
    config = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 300,
    }
    (model / "config.json").write_text(json.dumps(config))
    loaded = catalog.load(str(TINY), [f"model.name={model}", "model.random_init=null"])
    with pytest.raises(BadInput, match=r"is a text-only model \(config.json of .* names no vision tower"):
        plan_for({}, loaded, [])


def test_a_quantized_vision_model_on_the_cpu_is_refused_before_launch():
    loaded = catalog.load(HUB_RECIPES[0], ["allow_cpu=true"])
    with pytest.raises(BadInput, match="model.load_in 4bit: a vision model on the CPU loads in 16 bits"):
        plan_for({}, loaded, [])


def test_vision_is_refused_under_fsdp_before_launch():
    with pytest.raises(BadInput, match="data.format vision cannot train under PARALLELISM=fsdp"):
        plan_for({"PARALLELISM": "fsdp"}, catalog.load(HUB_RECIPES[0]), gpus.assumed("2x80"))


# ---- the plan and the bundled recipes


@pytest.mark.parametrize("name", HUB_RECIPES)
def test_the_bundled_vision_recipes_plan_data_parallel_on_two_gpus(name):
    p = plan_for({"PARALLELISM": "ddp"}, catalog.load(name), gpus.assumed("2x80"))
    assert (p.mode, p.num_processes) == ("ddp", 2)


GEMMA3_4B = {
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 262208,
    },
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27},
}


def test_the_memory_estimate_counts_the_vision_tower_and_its_adapters():
    shape = memory.Shape.from_config(GEMMA3_4B)
    text_only = memory.Shape.from_config({"text_config": GEMMA3_4B["text_config"]})
    assert shape.vision == (1152, 4304, 27) and text_only.vision is None
    assert shape.parameters() - text_only.parameters() == 27 * (4 * 1152**2 + 2 * 1152 * 4304)  # ~0.41B
    frozen = catalog.load("gemma-3-4b-vision-sft").recipe  # lora.finetune_vision_layers: false
    trained = catalog.load("gemma-3-4b-vision-sft", ["lora.finetune_vision_layers=true"]).recipe
    with_tower = memory.estimate_from_shape(trained, shape, "config.json")
    assert with_tower.trainable_gib > memory.estimate_from_shape(frozen, shape, "config.json").trainable_gib
    assert with_tower.weights_gib > memory.estimate_from_shape(trained, text_only, "config.json").weights_gib


def test_a_vision_tower_is_read_from_config_json_whatever_its_family_calls_its_sizes():
    # Qwen2-VL's hidden_size is the language model's width; its tower's is embed_dim.
    qwen2_vl = {"vision_config": {"embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "depth": 32}}
    qwen2_5_vl = {
        "vision_config": {"hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 3584, "depth": 32}
    }
    gemma3 = {"vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27}}
    assert memory.vision_tower(qwen2_vl) == (1280, 5120, 32)
    assert memory.vision_tower(gemma3) == (1152, 4304, 27)
    assert memory.vision_tower(qwen2_5_vl) == (1280, 3420, 32)
    assert memory.vision_tower({"hidden_size": 64}) is None
