"""The data phase prepared once: the rows SFTTrainer takes are tokenized by the training program as
TRL's own preparation would tokenize them; under ddp local rank 0 checks, shapes and tokenizes and
the other rank only reads; the result is kept in the cache volume, keyed on what changes it, and a
second run reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_cli

from recipes import catalog

DATA = ROOT / "tests" / "data"
SHAREGPT = ROOT / "tests" / "recipes" / "tiny-sharegpt.yaml"


@pytest.fixture(scope="module")
def tiny():
    """The bundled test tokenizer and a tiny random Llama of its vocabulary; Unsloth imported first,
    as the training program does, since it patches TRL's preparation (on the CPU: no packing)."""
    import unsloth  # noqa: F401
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer, LlamaForCausalLM(config)


CASES = {
    "sharegpt": (SHAREGPT, []),
    "sharegpt-responses-only": (SHAREGPT, ["data.train_on_responses_only=true"]),
    "sharegpt-cut": (SHAREGPT, ["model.max_seq_length=40"]),
    "sharegpt-packed": (SHAREGPT, ["training.packing=true"]),
    "instruction": (ROOT / "tests" / "recipes" / "tiny-instruction.yaml", []),
    "text": (ROOT / "tests" / "recipes" / "tiny-cpt.yaml", []),
}


@pytest.mark.parametrize("case", CASES)
def test_the_prepared_rows_are_those_trls_own_preparation_makes(tiny, tmp_path, case):
    import trl

    from trainer import data, prepare

    tokenizer, model = tiny
    path, overrides = CASES[case]
    recipe = catalog.load(str(path), overrides).recipe
    shaped, _ = data.build(recipe.data, recipe.training.seed)
    ours = prepare.tokenize(shaped, tokenizer, recipe, prepare.Counter())
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_length=recipe.model.max_seq_length, packing=recipe.training.packing,
        completion_only_loss=recipe.data.train_on_responses_only or None, report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    theirs = trl.SFTTrainer(model=model, args=args, train_dataset=shaped, processing_class=tokenizer).train_dataset
    columns = ["input_ids", "labels", *(["seq_lengths"] if prepare.packs(recipe) else [])]
    assert ours.column_names == columns
    assert ours.to_list() == theirs.select_columns(columns).to_list()


def test_the_prepared_rows_are_keyed_on_the_datas_content_and_the_recipes_data(tmp_path):
    from trainer import prepare

    rows = (DATA / "sharegpt.jsonl").read_text()
    (tmp_path / "chats.jsonl").write_text(rows)
    overrides = [f"data.source={tmp_path}/chats.jsonl"]
    key = prepare.shaped_key(catalog.load(str(SHAREGPT), overrides).recipe)
    assert prepare.shaped_key(catalog.load(str(SHAREGPT), overrides).recipe) == key
    assert prepare.shaped_key(catalog.load(str(SHAREGPT), [*overrides, "training.max_steps=3"]).recipe) == key
    assert prepare.shaped_key(catalog.load(str(SHAREGPT), [*overrides, "data.max_samples=40"]).recipe) != key
    (tmp_path / "chats.jsonl").write_text(rows.replace("Paris", "Lyon"))
    assert prepare.shaped_key(catalog.load(str(SHAREGPT), overrides).recipe) != key


def ddp_run(folder: Path, cache: Path, out: str) -> dict:
    env = clean_env(CPU_PROCESSES="2", PARALLELISM="ddp", HF_HOME=str(cache))
    overrides = ["data.train_on_responses_only=true", "training.max_steps=10", f"output.dir={folder / out}"]
    done = run_cli("run", str(SHAREGPT), *overrides, cwd=folder, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: tiny-sharegpt [ddp x2] 10 steps" in done.stdout
    assert "Tokenizing train dataset" not in done.stdout + done.stderr, "TRL prepared nothing, on no rank"
    return json.loads((folder / out / "metrics.json").read_text())


@pytest.mark.e2e
def test_under_ddp_local_rank_0_prepares_once_the_other_reads_and_a_second_run_reuses_it(tmp_path):
    first = ddp_run(tmp_path, tmp_path / "cache", "first")
    zero, one = first["data_per_rank"]
    assert (zero["shaped"]["done"], zero["shaped"]["rows"]) == ("built", 48)
    assert (zero["tokenized"]["done"], zero["tokenized"]["rows"]) == ("built", 48)
    assert [(one[s]["done"], one[s]["rows"]) for s in ("shaped", "tokenized")] == [("read", 0), ("read", 0)]
    assert one["tokenized"]["folder"] == zero["tokenized"]["folder"]
    assert Path(zero["tokenized"]["folder"]).is_relative_to(tmp_path / "cache" / "unsloth-recipes" / "prepared")
    assert first["data_prepare_s"] == zero["seconds"] > 0
    assert first["final_loss"] < first["first_loss"] and first["trainable_fingerprints"][0] == first[
        "trainable_fingerprints"][1]  # fmt: skip

    second = ddp_run(tmp_path, tmp_path / "cache", "second")
    zero, one = second["data_per_rank"]
    assert [(zero[s]["done"], zero[s]["rows"]) for s in ("shaped", "tokenized")] == [("reused", 0), ("reused", 0)]
    assert [one[s]["done"] for s in ("shaped", "tokenized")] == ["read", "read"]
    assert second["losses"] == first["losses"], "the same rows, the same training"
