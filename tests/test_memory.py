"""The memory planner: shapes from config.json (local folder, Hugging Face cache), exact
parameter and LoRA counts, and the fallback from the model name."""

from __future__ import annotations

import json

import pytest
from conftest import LLAMA_3_8B, write_recipe

from entrypoint import hub, memory
from recipes import catalog

RECIPE = """
model: {{name: {name}, load_in: {load}, max_seq_length: 2048}}
data: {{source: org/data, format: text}}
training: {{per_device_batch_size: 4}}
"""


def recipe(tmp_path, name: str, load: str = "16bit"):
    return catalog.load(str(write_recipe(tmp_path, "r", RECIPE.format(name=name, load=load)))).recipe


def test_llama_3_8b_config_gives_its_published_parameter_count():
    shape = memory.Shape.from_config(LLAMA_3_8B)
    assert (shape.embedding_params() + shape.linear_params()) / 1e9 == pytest.approx(8.03, abs=0.01)


def test_lora_parameters_are_counted_exactly_for_rank_and_targets():
    shape = memory.Shape.from_config(LLAMA_3_8B)
    # r=16 on all seven projections of Llama-3-8B: PEFT reports 41,943,040 trainable parameters.
    assert (
        shape.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        == 41_943_040
    )
    assert shape.lora_params(16, ["q_proj", "v_proj"]) == 32 * 16 * (4096 + 4096 + 4096 + 1024)


def test_tied_embeddings_count_once_and_experts_multiply_the_mlp():
    tied = memory.Shape.from_config(LLAMA_3_8B | {"tie_word_embeddings": True})
    assert tied.embedding_params() == 128256 * 4096
    moe = memory.Shape.from_config(LLAMA_3_8B | {"num_local_experts": 8})
    dense = memory.Shape.from_config(LLAMA_3_8B)
    mlp = 32 * 3 * 4096 * 14336
    assert moe.linear_params() - dense.linear_params() == 7 * mlp


def test_a_local_model_folder_config_is_used(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B))
    r = recipe(tmp_path, str(folder))
    est = memory.estimate(r, *hub.local_config(r, {}))
    assert est.source.startswith("config.json of") and est.params_b == pytest.approx(8.03, abs=0.01)


def test_the_hugging_face_cache_config_is_used_without_the_network(tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--Mystery-Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_3_8B))
    r = recipe(tmp_path, "someorg/Mystery-Model")
    est = memory.estimate(r, *hub.local_config(r, {"HF_HOME": str(tmp_path / "hf")}))
    assert est.params_b == pytest.approx(8.03, abs=0.01)
    assert memory.estimate(r, *hub.local_config(r, {"HF_HOME": str(tmp_path / "none")})).params_b is None


def test_without_a_config_the_size_comes_from_the_name(tmp_path):
    r = recipe(tmp_path, "unsloth/Qwen3-32B", "4bit")
    est = memory.estimate(r, *hub.local_config(r, {"HF_HOME": str(tmp_path)}))
    assert est.params_b == 32 and "model name" in est.source


def test_4bit_needs_far_less_than_16bit_for_the_same_model(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_3_8B))
    full, quantized = (recipe(tmp_path, str(folder), load) for load in ("16bit", "4bit"))
    full, quantized = (memory.estimate(r, *hub.local_config(r, {})) for r in (full, quantized))
    assert quantized.weights_gib < 0.4 * full.weights_gib


def test_the_estimate_is_within_20_percent_of_the_peaks_measured_on_an_h100():
    # Peaks measured by bench/throughput.py (launcher runs); the estimate is recomputed by this code.
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from memory_accuracy import bench_recipe

    runs = {}
    for name in ("throughput-h100.json", "full-finetuning-h100.json"):  # LoRA / QLoRA, then full fine-tuning
        runs |= json.loads((ROOT / "docs" / "benchmarks" / name).read_text())["runs"]
    launcher_runs = [r for r in runs.values() if r["stack"] == "launcher"]
    assert len(launcher_runs) == 6 and {r["load"] for r in launcher_runs} == {"16bit", "4bit", "full"}
    for run in launcher_runs:
        est = memory.estimate(bench_recipe(run["size"], run["load"]))
        allocated = est.total_gib - memory.CUDA_OVERHEAD_GIB  # torch's peak leaves the context out
        measured = max(run["peak_memory_gib"].values())
        assert abs(allocated / measured - 1) <= 0.2, (run["size"], run["load"], allocated, measured)


def test_the_fsdp_estimate_is_within_20_percent_of_the_peaks_measured_under_fsdp_on_h200s():
    # Training peaks of bench/multigpu.py's fsdp runs (2 and 4 H200s); the estimate is recomputed here.
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from memory_accuracy import bench_recipe

    runs = json.loads((ROOT / "docs" / "benchmarks" / "multigpu-h200.json").read_text())["runs"]
    sharded = [r for r in runs if r.get("kind") == "train" and r["mode"] == "fsdp" and r["exit_status"] == 0]
    assert {(r["model"], r["load"], r["num_gpus"]) for r in sharded} >= {("8b", "4bit", 2), ("8b", "4bit", 4)}
    for run in sharded:
        est = memory.estimate(bench_recipe(run["model"], run["load"]))
        n = run["num_gpus"]
        planned = memory.train_gib(est, "fsdp", n, n, run["gpu_memory_gib"]) - memory.CUDA_OVERHEAD_GIB
        assert abs(planned / max(run["peak_memory_gib"]) - 1) <= 0.2, (run["job"], planned, run["peak_memory_gib"])
