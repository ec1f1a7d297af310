"""After a vision run: the merged export (the whole image-text model, answering as base + adapter),
generate with an image, and what a vision run cannot do yet."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli

from recipes import catalog
from recipes.errors import BadInput

DATA = ROOT / "tests" / "data" / "vision"


def image_and_question(processor):
    from PIL import Image

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    return processor(text=[text], images=[[Image.open(DATA / "images" / "red.png")]], return_tensors="pt")


@pytest.mark.e2e
def test_a_vision_run_exports_a_merged_image_text_model_that_answers_as_base_plus_adapter(language_only_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = language_only_run / "outputs" / "tiny-vision"
    done = run_cli("export", str(run), "--to", "merged_16bit", cwd=language_only_run)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForImageTextToText.from_pretrained(run / "merged_16bit", dtype=torch.float32)
    assert merged.config.vision_config is not None, "the vision tower is part of the merged model"
    (base_config,) = (run / "random-model").glob("*/config.json")
    base = AutoModelForImageTextToText.from_pretrained(base_config.parent, dtype=torch.float32)
    expected = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base_config.parent, dtype=torch.float32), str(run / "adapter")
    )
    inputs = image_and_question(AutoProcessor.from_pretrained(run / "merged_16bit"))
    with torch.no_grad():
        got, want, untrained = merged(**inputs).logits, expected(**inputs).logits, base(**inputs).logits
    # What the adapter changes survives the merge, up to 16-bit rounding (here 0.7% of it).
    assert (got - want).abs().max() < 0.03 * (untrained - want).abs().max()


@pytest.mark.e2e
def test_generate_answers_a_question_about_an_image_with_the_trained_model(language_only_run):
    run = language_only_run / "outputs" / "tiny-vision"
    image = DATA / "images" / "blue.png"
    done = run_cli("generate", str(run), "--prompt", "What colour?", "--image", str(image), "--max-new-tokens", "4",
                   cwd=language_only_run)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("It is"), done.stdout  # every answer of the training data starts so


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "{run}", "--to", "gguf:q8_0"], r"export --to gguf of run tiny-vision: it trained a vision model"),
        (["generate", "{run}", "--prompt", "Hi", "--image", "gone.png"], r"--image 'gone.png' is not a file"),
        (["generate", "{run}", "--prompt", "Hi", "--image", "{text}"], r"--image '.*notes.png' is not an image PIL"),
    ],
)
def test_what_a_vision_run_cannot_do_yet_is_refused_with_the_fix(language_only_run, args, message):
    run = language_only_run / "outputs" / "tiny-vision"
    text = language_only_run / "notes.png"  # a text file, named like an image
    text.write_text("not an image\n")
    done = run_cli(*[a.format(run=run, text=text) for a in args], cwd=language_only_run)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_an_image_for_a_text_run_is_refused(tmp_path):
    from entrypoint import followup
    from recipes.runs import Run

    text_run = Run(tmp_path, catalog.load("smoke").recipe)
    with pytest.raises(BadInput, match="trained a text model .*, which takes no images; leave --image out"):
        followup.check_image(text_run, str(DATA / "images" / "red.png"))


@pytest.mark.e2e
def test_generate_puts_the_image_through_the_processor(language_only_run):
    from recipes.runs import Run
    from trainer import generate

    run = Run.read(language_only_run / "outputs" / "tiny-vision")
    _, processor = generate.load(run)
    turn = generate.vision_turn("What colour?", str(DATA / "images" / "red.png"))
    inputs = processor.apply_chat_template(
        [turn], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert "pixel_values" in inputs and inputs["pixel_values"].shape[-2:] == (56, 56)
