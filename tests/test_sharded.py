"""A model no one device should hold whole trains under fsdp loaded shard by shard, for real on the
CPU (two processes, gloo): each rank reads only its rows of every linear weight from the model's
safetensors checkpoint (written before the launch, as a hub checkpoint is), so each holds markedly
less host memory than a ddp rank, and trains the same model, resumes and exports as ddp does.

The model is 199M parameters, 381 MiB in 16 bits: big enough that a quarter of it stands well above
a process's noise, small enough for two cores. Measured here (2 cores): a ddp rank peaks at 1.31 GiB
(the model mapped from its file, and the copy the Trainer moves to the CPU device), an fsdp rank at
0.69 once loaded and sharded and 1.14 while training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_cli

from recipes.schema import RandomInit

SHAPE = RandomInit(
    hidden_size=1536, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
    vocab_size=512, seed=0,
)  # fmt: skip
GIB = 1024**3
STEPS = ["training.max_steps=4", "output.save_steps=2", "logging.steps=1", "training.per_device_batch_size=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """(the model folder, its weights' bytes)."""
    from trainer import random_model

    rows = [json.loads(line) for line in (ROOT / "recipes" / "datasets" / "smoke.jsonl").read_text().splitlines()]
    texts = [m["content"] for row in rows for m in row["messages"]]
    folder = random_model.build(SHAPE, texts, tmp_path_factory.mktemp("hub") / "a-199m-model", 128)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return folder, weights


def train(folder: Path, model: Path, parallelism: str, *overrides: str) -> dict:
    recipe = [f"model.name={model}", "model.random_init=null", "model.dtype=bfloat16", "data.eval_fraction=null"]
    recipe += ["training.eval_steps=0", "logging.report_to=none", *STEPS, *overrides]
    env = clean_env(CPU_PROCESSES="2", PARALLELISM=parallelism)
    done = run_cli("run", "smoke", *recipe, cwd=folder, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((folder / "outputs" / "smoke" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ddp(checkpoint, tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("ddp"), checkpoint[0], "ddp")


@pytest.fixture(scope="module")
def fsdp(checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fsdp")
    return folder, train(folder, checkpoint[0], "fsdp", "output.save=[adapter,merged_16bit]")


@pytest.mark.e2e
@pytest.mark.parametrize("when", ["peak_host_memory_at_load_gib", "peak_host_memory_gib"])
def test_each_fsdp_rank_holds_at_least_a_quarter_of_the_model_less_than_a_ddp_rank(checkpoint, ddp, fsdp, when):
    weights = checkpoint[1]
    sharded, whole = fsdp[1][when], ddp[when]
    assert len(sharded) == len(whole) == 2
    for rank, held in enumerate(sharded):
        saved = (min(whole) - held) * GIB
        assert saved >= weights / 4, f"rank {rank} {when}: {held} GiB under fsdp, {whole} under ddp ({weights} B)"


@pytest.mark.e2e
def test_fsdp_loaded_shard_by_shard_trains_the_losses_ddp_trains(ddp, fsdp):
    # fsdp computes in bf16 where ddp keeps the float32 LoRA weights: steps differ by rounding only.
    sharded, whole = fsdp[1]["losses"], ddp["losses"]
    assert [s for s, _ in sharded] == [s for s, _ in whole] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(sharded, whole, strict=True):
        assert a == pytest.approx(b, rel=0.01), (step, a, b)
    assert fsdp[1]["trainable_elements_per_rank"][0] < ddp["trainable_elements_per_rank"][0]


@pytest.mark.e2e
def test_a_sharded_run_exports_its_merged_model_and_resumes(checkpoint, fsdp):
    folder, first = fsdp
    out = folder / "outputs" / "smoke"
    assert first["exported"] == [str(out / "merged_16bit")]
    config = json.loads((out / "merged_16bit" / "config.json").read_text())
    assert config["hidden_size"] == SHAPE.hidden_size and any((out / "merged_16bit").glob("*.safetensors"))
    again = train(folder, checkpoint[0], "fsdp", "training.max_steps=6")
    assert again["resumed_from"] == str(out / "checkpoints" / "checkpoint-4") and again["steps"] == 6
