"""validate and plan say what the data is, from the rows the launcher reads: each source's format, its
lengths as the training program will see them (tokens under the recipe's tokenizer where it is on
this machine, else characters), how many rows max_seq_length cuts, and the padding of a padded batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import ROOT, clean_env, run_cli, write_recipe

from entrypoint import datareport

DATA = ROOT / "tests" / "data"


def recipe(tmp_path: Path, model: str, extra: str = "") -> Path:
    text = f"""
allow_cpu: true
model: {{name: {model}, max_seq_length: 80, load_in: 16bit}}
data: {{source: {DATA}/sharegpt.jsonl, format: sharegpt}}
training: {{per_device_batch_size: 4, seed: 5{extra}}}
"""
    return write_recipe(tmp_path, "report", text)


def planned_data(tmp_path: Path, path: Path, **env: str) -> list[dict]:
    done = run_cli("plan", str(path), "--json", cwd=tmp_path, env=clean_env(**env))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["data"]


def chats() -> list[list[dict]]:
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    rows = [json.loads(line) for line in (DATA / "sharegpt.jsonl").read_text().splitlines()]
    return [[{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]] for row in rows]


def test_validate_names_the_format_and_counts_characters_without_a_local_tokenizer(tmp_path):
    done = run_cli("validate", str(recipe(tmp_path, "someorg/Uncached-Model-1B")), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lengths = sorted(sum(len(m["content"]) for m in chat) for chat in chats())
    assert f"# data.source {DATA}/sharegpt.jsonl: format sharegpt, 48 rows read" in done.stderr
    assert (
        f"#   characters (no tokenizer of someorg/Uncached-Model-1B here (local or cached)): p50 {lengths[23]}, "
        f"p95 {lengths[45]}, max {lengths[-1]}; padded batches of 4:" in done.stderr
    )
    assert "longer than model.max_seq_length" not in done.stderr, "a cut is counted in tokens only"


def test_with_a_local_tokenizer_the_lengths_are_the_tokens_transformers_renders(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    counts = sorted(
        len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in chats()
    )
    (report,) = planned_data(tmp_path, recipe(tmp_path, str(DATA / "tokenizer")))
    assert (report["unit"], report["rows_read"], report["format"]) == ("tokens", 48, "sharegpt")
    assert (report["p50"], report["p95"], report["max"]) == (counts[23], counts[45], counts[-1])
    assert report["longer_than_max_seq_length"] == sum(n > 80 for n in counts) > 0
    assert 0 < report["padding_share"] < 1 and report["measured_by"] == f"tokens (tokenizer.json of {DATA}/tokenizer)"


def test_the_padding_share_is_what_padded_batches_in_a_seeded_order_hold_as_padding():
    assert datareport.padding_share([2, 4], batch=2, seed=0) == 0.25  # 6 tokens in 2 x 4 positions
    assert datareport.padding_share([3, 9, 3, 9], batch=1, seed=0) == 0.0


def test_packed_rows_are_reported_without_padding(tmp_path):
    (report,) = planned_data(tmp_path, recipe(tmp_path, str(DATA / "tokenizer"), ", packing: true"))
    assert report["padding_share"] is None


def test_a_tokenizer_in_the_hugging_face_cache_is_read_there_and_nothing_is_fetched(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--Cached-Model-1B" / "snapshots" / "0123abc"
    shutil.copytree(DATA / "tokenizer", snapshot)
    (report,) = planned_data(tmp_path, recipe(tmp_path, "someorg/Cached-Model-1B"), HF_HOME=str(tmp_path / "hf"))
    assert report["unit"] == "tokens" and report["measured_by"] == f"tokens (tokenizer.json of {snapshot})"


def test_rows_the_chat_template_refuses_are_noted_and_counted_in_characters(tmp_path):
    folder = tmp_path / "strict"
    shutil.copytree(DATA / "tokenizer", folder)
    template = (folder / "chat_template.jinja").read_text()
    refusal = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (folder / "chat_template.jinja").write_text(refusal + template)
    (report,) = planned_data(tmp_path, recipe(tmp_path, str(folder)))
    with_system = sum(chat[0]["role"] == "system" for chat in chats())
    assert (
        f"the chat template refuses {with_system} of 48 rows (counted in characters): System role not supported"
        in (report["notes"])
    )


def test_a_hub_dataset_is_left_to_the_training_program(tmp_path):
    path = recipe(tmp_path, "someorg/Uncached-Model-1B")
    path.write_text(path.read_text().replace(f"{DATA}/sharegpt.jsonl", "mlabonne/FineTome-100k"))
    done = run_cli("plan", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "data        data.source mlabonne/FineTome-100k: format sharegpt; a hub dataset, whose rows the training "
        "program checks before the model loads" in done.stdout
    )


def test_a_tokenizer_file_that_does_not_load_leaves_lengths_in_characters_saying_why(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(DATA / "tokenizer", folder)
    (folder / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    (report,) = planned_data(tmp_path, recipe(tmp_path, str(folder)))
    assert report["unit"] == "characters"
    assert report["measured_by"].startswith(f"characters (the tokenizer.json of {folder} does not load here: ")
