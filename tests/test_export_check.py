"""The export check's parts that need no model: which rows it scores, how it reads llama-perplexity's
results, the tolerance of every target, and the line a failed target gets. The checks themselves run
in test_export.py (merged_16bit) and test_docker.py (GGUF files, with the compiled llama.cpp)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import ROOT

from recipes import catalog, exports

SMOKE = catalog.load("smoke").recipe


def smoke_data(**changes):
    source = str(ROOT / "recipes" / SMOKE.data.source)
    return SMOKE.data.model_copy(update={"source": source, **changes})


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """The prepared-data cache in a folder of the test's own."""
    from trainer import prepare

    monkeypatch.setattr(prepare, "cache_root", lambda: tmp_path)
    return prepare


def test_the_check_scores_the_evaluation_rows_the_run_held_out_of_training(prepared):
    from trainer import data

    recipe = SMOKE.model_copy(update={"data": smoke_data()})
    _, held_out_of_training = data.build(recipe.data, SMOKE.training.seed)
    rows, origin = prepared.held_out(recipe, 24)
    assert rows == list(held_out_of_training) and len(rows) == 9
    assert origin == "the run's evaluation rows (data.eval_fraction 0.1)"


def test_without_evaluation_rows_the_check_scores_a_seeded_sample_of_the_training_rows_and_says_so(prepared):
    from trainer import data

    recipe = SMOKE.model_copy(update={"data": smoke_data(eval_fraction=None)})
    training, _ = data.build(recipe.data, SMOKE.training.seed)
    rows, origin = prepared.held_out(recipe, 24)
    assert len(rows) == 24 and all(row in list(training) for row in rows)
    assert rows == prepared.held_out(recipe, 24)[0], "the same sample every time"
    seed = SMOKE.training.seed
    assert origin == f"a seeded sample of the training rows (seed {seed}): the run has no evaluation rows"


def logits_file(path, n_ctx: int, n_vocab: int, tokens: list[int], rows: list[tuple[float, float, list[int]]]):
    """A file in llama-perplexity's --save-all-logits layout (tools/perplexity/perplexity.cpp)."""
    width = 2 * ((n_vocab + 1) // 2) + 4
    out = b"_logits_" + struct.pack("<3i", n_ctx, n_vocab, len(tokens) // n_ctx)
    out += struct.pack(f"<{len(tokens)}i", *tokens)
    for scale, min_log_prob, steps in rows:
        row = np.zeros(width, dtype="<u2")
        row[:4] = np.frombuffer(struct.pack("<2f", scale, min_log_prob), dtype="<u2")
        row[4 : 4 + n_vocab] = steps
        out += row.tobytes()
    path.write_bytes(out)


def test_llama_perplexitys_logits_file_gives_the_perplexity_and_the_tokens_llama_cpp_made(tmp_path):
    """n_ctx 4: the second half of each chunk is scored, one prediction per chunk (position 2 ->
    token 3); log p = min_log_prob + scale x steps of the token that came."""
    from trainer.export_check import Material, read_logits

    tokens = [0, 1, 2, 1, 0, 2, 1, 2]
    rows = [(0.001, -5.0, [0, 3000, 0]), (0.002, -4.0, [0, 0, 1000])]  # log p: -2.0, then -2.0
    logits_file(tmp_path / "logits.bin", 4, 3, tokens, rows)
    m = Material("rows", 2, "text", tokens, n_ctx=4, chunks=2, prompts=[], chat=True)
    ppl, made = read_logits(tmp_path / "logits.bin", m)
    assert ppl == pytest.approx(np.exp(2.0), rel=1e-6) and made == tokens


def test_every_export_that_is_checked_has_a_tolerance():
    assert set(exports.CHECK_TOLERANCE) == {"merged_16bit", *exports.GGUF_QUANTS}
    assert exports.CHECK_TOLERANCE["q8_0"] < exports.CHECK_TOLERANCE["q4_k_m"] < exports.CHECK_TOLERANCE["q2_k"]


def test_a_failed_target_gets_one_line_with_its_name_and_figures():
    from trainer.export_check import failure_lines

    check = {"ok": False, "perplexity": 99.5, "trained_perplexity": 10.0, "rows": 9, "ratio": 9.95,
             "tolerance": 0.03, "prompts_rendered_as_trained": "0/4"}  # fmt: skip
    records = [
        {"kind": "adapter", "path": "/r/adapter"},
        {"kind": "gguf", "path": "/r/gguf/smoke-q8_0.gguf", "check": check},
        {"kind": "gguf", "path": "/r/gguf/smoke-f16.gguf", "check": {**check, "ok": True}},
    ]
    assert failure_lines(records) == [
        "export check failed: gguf smoke-q8_0.gguf: perplexity 99.5 vs the trained model's 10 on 9 held-out rows "
        "(ratio 9.95, tolerance ±0.03); prompts rendered as in training: 0/4"
    ]
