"""Chats as users already have them: ShareGPT rows (`data.format: sharegpt`) and chats in a layout of
their own (`data.chat`), checked row by row before anything loads, shaped as `messages` rows are;
and what the launcher says when the rows fit another format or layout than the recipe's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_recipe

from recipes import catalog, formats

DATA = ROOT / "tests" / "data"
SHAREGPT = ROOT / "tests" / "recipes" / "tiny-sharegpt.yaml"


def turn(who: str, text: str) -> dict:
    return {"from": who, "value": text}


# ---- what a row holds, and how it is shaped


def test_a_sharegpt_row_is_a_chat_of_human_and_gpt_turns_shaped_as_messages():
    row = {"conversations": [turn("system", "Be brief."), turn("human", "Hi?"), turn("gpt", "Hello.")]}
    assert formats.row_problem(row, "sharegpt") is None
    shaped = formats.shape_row(row, "sharegpt", formats.Shaping("x.jsonl", None, False))
    assert shaped == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                   {"role": "assistant", "content": "Hello."}]}  # fmt: skip


def test_sharegpt_tool_roles_are_the_assistants_call_and_the_tools_answer():
    row = {"conversations": [turn("human", "Weather?"), turn("function_call", '{"name": "weather"}'),
                             turn("observation", '{"sky": "clear"}'), turn("gpt", "Clear.")]}  # fmt: skip
    shaped = formats.shape_row(row, "sharegpt", formats.Shaping("x.jsonl", None, False))
    assert [m["role"] for m in shaped["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_train_on_responses_only_leaves_the_loss_to_the_last_gpt_turn():
    row = {"conversations": [turn("human", "A?"), turn("gpt", "a"), turn("human", "B?"), turn("gpt", "b")]}
    shaped = formats.shape_row(row, "sharegpt", formats.Shaping("x.jsonl", None, True))
    assert shaped["completion"] == [{"role": "assistant", "content": "b"}]
    assert [m["content"] for m in shaped["prompt"]] == ["A?", "a", "B?"]


def recipe_file(tmp_path: Path, data: str, rows: list[dict] | None = None) -> Path:
    if rows is not None:
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (
        SHAREGPT.read_text().split("data:\n")[0]
        + data
        + "\n"
        + "training:"
        + SHAREGPT.read_text().split("training:")[1]
    )
    return write_recipe(tmp_path, "chats", text.replace("../data/", f"{DATA}/"))


def test_a_custom_layout_is_read_through_the_mapping_and_trains_as_chats(tmp_path):
    from trainer import data

    mapping = "{turns: dialogue, role: speaker, content: text, roles: {customer: user, agent: assistant}}"
    path = recipe_file(tmp_path, f"data:\n  source: ../data/dialogue.jsonl\n  chat: {mapping}")
    recipe = catalog.load(str(path)).recipe
    train, _ = data.build(recipe.data, seed=0)
    assert len(train) == 24
    assert train[0]["messages"] == [{"role": "user", "content": "How much is a kettle?"},
                                    {"role": "assistant", "content": "A kettle costs 12 euros."}]  # fmt: skip


def test_role_names_of_the_mapping_are_added_to_the_formats_own():
    source = catalog.load(str(SHAREGPT), ["data.chat={roles: {bot: assistant}}"]).recipe.data.datasets[0]
    row = {"conversations": [turn("human", "Hi?"), turn("bot", "Hello.")]}
    assert formats.row_problem(row, "sharegpt", source.layout) is None
    assert source.layout.roles["gpt"] == "assistant" and source.layout.roles["bot"] == "assistant"


# ---- refused, before anything loads


GOOD = [turn("human", "Hi?"), turn("gpt", "Hello.")]


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        (
            [{"conversations": [turn("human", "Hi?"), {"from": "gpt"}]}],
            [],
            r"row 1 conversations\[1\] has no text field 'value', so it does not match data.format sharegpt",
        ),
        (
            [{"conversations": [turn("human", "Hi?"), turn("bot", "Hello.")]}],
            [],
            r"conversations\[1\].from is 'bot', not one of system, human, .*; data.chat.roles says what another name "
            r"means, e.g. \{bot: assistant\}",
        ),
        (
            [{"conversations": GOOD}, {"conversations": [turn("human", "Hi?"), turn("gpt", " ")]}],
            [],
            r"row 2 conversations\[1\].value is empty \(assistant turns need text\); give it text or drop the row",
        ),
        ([{"conversations": [turn("human", "Hi?")]}], [], r"has no assistant turn \(gpt, assistant, function_call\)"),
        ([{"chat": GOOD}], [], r"field 'conversations' is missing .*; these rows fit data.chat: \{turns: chat\}"),
        (
            [{"conversations": GOOD}],
            ["data.chat={roles: {bot: robot}}"],
            r"data.chat.roles.bot = 'robot': Input should be 'system', 'user', 'assistant' or 'tool'",
        ),
        (
            [{"conversations": GOOD}],
            ["data.format=text", "data.chat={turns: x}"],
            r"data.chat maps the turns of chat rows \(format messages or sharegpt\), and the format is text",
        ),
    ],
    ids=["missing-key", "unknown-role", "empty-turn", "no-answer", "other-layout", "mapped-to-no-role", "not-chats"],
)
def test_a_bad_row_or_mapping_is_one_error_line_exit_2_and_nothing_written(tmp_path, rows, overrides, message):
    path = recipe_file(tmp_path, f"data:\n  source: {tmp_path}/rows.jsonl\n  format: sharegpt", rows)
    done = run_cli("run", str(path), *overrides, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "outputs").exists()


def test_sharegpt_rows_under_the_default_format_are_refused_with_the_line_to_set(tmp_path):
    path = recipe_file(tmp_path, "data:\n  source: ../data/sharegpt.jsonl")
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert "so it does not match data.format messages; these rows fit data.format: sharegpt" in done.stderr


def test_chats_in_a_layout_of_their_own_are_refused_with_the_mapping_to_set(tmp_path):
    path = recipe_file(tmp_path, "data:\n  source: ../data/dialogue.jsonl")
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2
    expected = "data.chat: {turns: dialogue, role: speaker, content: text, roles: {customer: user, agent: assistant}}"
    assert f"these rows fit {expected} (set that in the recipe)" in done.stderr


# ---- trains


def metrics(folder: Path) -> dict:
    return json.loads((folder / "outputs" / "tiny-sharegpt" / "metrics.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize("responses_only", [False, True], ids=["whole-chats", "responses-only"])
def test_a_sharegpt_file_trains_in_one_process(tmp_path, responses_only):
    done = run_cli("run", str(SHAREGPT), f"data.train_on_responses_only={str(responses_only).lower()}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    m = metrics(tmp_path)
    assert m["steps"] == 20 and m["final_loss"] < 0.6 * m["first_loss"], m["losses"]
    assert (tmp_path / "outputs" / "tiny-sharegpt" / "adapter" / "adapter_model.safetensors").is_file()
