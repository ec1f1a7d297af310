"""Several datasets in one recipe (`data.sources`): each with its own source, format, mapping and
share, mixed reproducibly by the seed; shares that do not add up, and sources that cannot shape to
one kind of row, refused before anything loads."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli, write_recipe

from recipes import catalog
from recipes.errors import BadInput

DATA = ROOT / "tests" / "data"
HEAD = f"""
allow_cpu: true
model: {{name: {DATA}/tokenizer, max_seq_length: 64, load_in: 16bit}}
training: {{max_steps: 2, seed: 11}}
data:
  sources:
    - source: {DATA}/sharegpt.jsonl
      format: sharegpt
"""
DIALOGUE = f"""    - source: {DATA}/dialogue.jsonl
      chat: {{turns: dialogue, role: speaker, content: text, roles: {{customer: user, agent: assistant}}}}
"""


def load(tmp_path, first: str = "", second: str = "", tail: str = "", overrides: tuple[str, ...] = ()):
    text = HEAD + (f"      {first}\n" if first else "") + DIALOGUE + (f"      {second}\n" if second else "") + tail
    return catalog.load(str(write_recipe(tmp_path, "mix", text)), overrides).recipe


def mix(recipe):
    from trainer import data

    return data.build(recipe.data, recipe.training.seed)


def from_dialogue(rows) -> int:
    return sum("euros" in row["messages"][-1]["content"] for row in rows)


def test_fractions_are_shares_of_the_largest_mix_the_sources_fill(tmp_path):
    train, held_out = mix(load(tmp_path, "fraction: 0.75", "fraction: 0.25"))
    # 48 ShareGPT chats and 24 dialogues: 64 rows is the most that keeps 3:1 without repeating a row.
    assert (len(train), from_dialogue(train), held_out) == (64, 16, None)


def test_rows_take_a_seeded_sample_of_a_source_and_a_source_without_a_share_gives_every_row(tmp_path):
    recipe = load(tmp_path, "rows: 10")
    train, _ = mix(recipe)
    assert (len(train), from_dialogue(train)) == (34, 24)
    again, _ = mix(recipe)
    other, _ = mix(load(tmp_path, "rows: 10", overrides=("training.seed=12",)))
    assert train["messages"] == again["messages"], "the same seed mixes the same rows in the same order"
    assert train["messages"] != other["messages"]


def test_one_held_out_share_of_the_mix_is_evaluated(tmp_path):
    train, held_out = mix(load(tmp_path, tail="  eval_fraction: 0.25\n"))
    assert (len(train), len(held_out)) == (54, 18)


def test_each_source_may_name_its_own_evaluation_rows(tmp_path):
    train, held_out = mix(load(tmp_path, second=f"eval_split: {DATA}/dialogue.jsonl"))
    assert (len(train), len(held_out), from_dialogue(held_out)) == (72, 24, 24)


def test_more_rows_than_a_source_holds_are_refused_naming_it(tmp_path):
    with pytest.raises(BadInput, match=r"data.sources\[1\].rows is 30, but .*dialogue.jsonl holds 24 rows"):
        mix(load(tmp_path, second="rows: 30"))


@pytest.mark.parametrize(
    ("first", "second", "tail", "message"),
    [
        ("fraction: 0.5", "fraction: 0.3", "", r"the fractions of data.sources add up to 0.8 \(0.5 \+ 0.3\), not 1"),
        ("fraction: 1.0", "", "", r"data.sources\[1\] has no fraction while others do"),
        ("rows: 5", "fraction: 1.0", "", r"data.sources\[0\] has no fraction while others do"),
        ("rows: 5\n      fraction: 0.5", "", "", r"rows \(5\) and fraction \(0.5\) both choose this source's share"),
        ("", "", "  format: sharegpt\n", r"data.format is a key of one source; with data.sources give it to each"),
        ("", "", "  source: x.jsonl\n", r"data needs source \(one dataset\) or sources .*, not both"),
        ("", "eval_split: x.jsonl", "  eval_fraction: 0.1\n", r"data.eval_fraction \(0.1\) and an eval_split"),
    ],
    ids=[
        "fractions-not-1",
        "fraction-missing",
        "rows-and-fractions",
        "rows-and-fraction",
        "top-format",
        "both",
        "two-evaluations",
    ],
)
def test_shares_that_do_not_add_up_are_refused_with_one_error_exit_2(tmp_path, first, second, tail, message):
    text = HEAD + (f"      {first}\n" if first else "") + DIALOGUE + (f"      {second}\n" if second else "") + tail
    done = run_cli("run", str(write_recipe(tmp_path, "mix", text)), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "outputs").exists()


def test_sources_that_shape_to_different_rows_are_refused_naming_both(tmp_path):
    text = HEAD + f"    - source: {DATA}/instruction.jsonl\n      format: instruction\n"
    both_named = r"data.sources\[0\].format sharegpt shapes to rows of messages and data.sources\[1\].format "
    with pytest.raises(BadInput, match=both_named + r"instruction to rows of prompt/completion.*responses_only=true"):
        catalog.load(str(write_recipe(tmp_path, "mix", text)))
    both = catalog.load(str(write_recipe(tmp_path, "mix", text)), ["data.train_on_responses_only=true"]).recipe
    assert [s.format for s in both.data.datasets] == ["sharegpt", "instruction"]


def test_a_bad_row_of_the_second_source_names_its_place_in_the_recipe(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"dialogue": [{"speaker": "customer", "text": "Hi"}]}\n')
    text = HEAD + DIALOGUE.replace(f"{DATA}/dialogue.jsonl", str(tmp_path / "bad.jsonl"))
    where = r"data.sources\[1\].source .*bad.jsonl row 1 field 'dialogue' has no assistant turn"
    with pytest.raises(BadInput, match=where + r" .* so it does not match data.sources\[1\].format messages"):
        catalog.load(str(write_recipe(tmp_path, "mix", text)))
