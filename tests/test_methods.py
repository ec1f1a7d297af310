"""Every training method trains on the CPU and its loss falls; overrides change the run; a run
resumes from its newest checkpoint exactly where it stopped; exports are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e
TEST_RECIPES = ROOT / "tests" / "recipes"


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("recipe", "falls_to"),
    [("tiny-cpt", 0.5), ("tiny-instruction", 0.5), ("tiny-dpo", 0.95)],
)
def test_each_method_trains_and_its_loss_falls(tmp_path, recipe, falls_to):
    done = run_cli("run", str(TEST_RECIPES / f"{recipe}.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    m = metrics(tmp_path / "outputs" / recipe)
    assert m["steps"] == 30
    assert m["final_loss"] < falls_to * m["first_loss"], m["losses"]
    adapter = tmp_path / "outputs" / recipe / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert [p.name for p in adapter.iterdir() if p.is_dir()] == [], "only the trained adapter (DPO's 'ref' is not)"


def test_overrides_change_the_run(tmp_path):
    done = run_cli("run", "smoke", "training.max_steps=7", "logging.steps=1", "lora.r=4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "smoke"
    m = metrics(out)
    assert m["steps"] == 7 and [step for step, _ in m["losses"]] == list(range(1, 8))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_a_stopped_run_resumes_from_its_newest_checkpoint_where_it_left_off(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["output.save_steps=5", "output.keep_checkpoints=2"]
    for folder in (straight, resumed):
        folder.mkdir()
    assert run_cli("run", "smoke", "training.max_steps=20", *common, cwd=straight).returncode == 0
    first = run_cli("run", "smoke", "training.max_steps=10", *common, cwd=resumed)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("run", "smoke", "training.max_steps=20", *common, cwd=resumed)
    assert second.returncode == 0, second.stderr[-3000:]
    m = metrics(resumed / "outputs" / "smoke")
    assert m["resumed_from"].endswith("checkpoint-10") and "resuming from" in second.stdout
    reference = dict(metrics(straight / "outputs" / "smoke")["losses"])
    assert [step for step, _ in m["losses"]] == [15, 20]
    for step, loss in m["losses"]:
        assert loss == pytest.approx(reference[step], rel=1e-4)
    kept = sorted(p.name for p in (resumed / "outputs" / "smoke" / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-15", "checkpoint-20"]


def test_resume_false_starts_fresh_and_a_finished_run_is_not_silently_rerun(tmp_path):
    assert run_cli("run", "smoke", "training.max_steps=5", "output.save_steps=5", cwd=tmp_path).returncode == 0
    again = run_cli("run", "smoke", "training.max_steps=5", "output.save_steps=5", cwd=tmp_path)
    assert again.returncode == 2 and "nothing left to train" in again.stderr and "output.resume=false" in again.stderr
    fresh = run_cli("run", "smoke", "training.max_steps=5", "output.resume=false", cwd=tmp_path)
    assert fresh.returncode == 0 and metrics(tmp_path / "outputs" / "smoke")["resumed_from"] is None


def test_merged_16bit_export_is_written_beside_the_adapter(tmp_path):
    done = run_cli("run", "smoke", "training.max_steps=3", "output.save=[adapter,merged_16bit]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = tmp_path / "outputs" / "smoke" / "merged_16bit"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert metrics(tmp_path / "outputs" / "smoke")["exported"] == [str(merged)]


def test_an_unknown_chat_template_is_refused_before_the_model_loads(tmp_path):
    done = run_cli("run", "smoke", "data.chat_template=chatm", cwd=tmp_path)
    assert done.returncode == 2 and "did you mean 'chatml'" in done.stderr
    assert not (tmp_path / "outputs" / "smoke" / "adapter").exists()


def test_a_tokenizer_without_a_chat_template_is_refused_before_the_model_loads(tmp_path):
    from trainer.random_model import _train_tokenizer

    folder = tmp_path / "no-template-model"  # a tokenizer only: no weights, so nothing could load them
    tokenizer = _train_tokenizer(["hello there, general kenobi"] * 20, 300)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    rows = tmp_path / "chats.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"allow_cpu: true\nmodel: {{name: {folder}, load_in: 16bit}}\ndata: {{source: {rows}, format: messages}}\n"
    )
    done = run_cli("run", str(recipe), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has no chat template" in done.stderr and "data.chat_template" in done.stderr
    assert "Traceback" not in done.stderr
