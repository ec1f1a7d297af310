"""The multi-GPU benchmark's own pieces, on the CPU in seconds: its schedule, how it reads a run's
metrics, and the 70B builder's safetensors (written by hand, so checked against transformers)."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bigmodel
import multigpu


def test_a_schedule_is_waves_of_lanes_side_by_side_of_jobs_in_turn():
    waves = multigpu.parse_schedule("1b-16bit-single | 8b-4bit-single; 70b-16bit-auto2 | faults, 8b-4bit-model2")
    assert [[[job.token for job in lane] for lane in wave] for wave in waves] == [
        [["1b-16bit-single"], ["8b-4bit-single"]],
        [["70b-16bit-auto2"], ["faults", "8b-4bit-model2"]],
    ]
    auto = waves[1][0][0]
    assert (auto.model, auto.load, auto.mode, auto.n, auto.pinned) == ("70b", "16bit", "auto", 2, True)
    assert not multigpu.parse_job("1b-16bit-ddp2*").pinned  # NUM_GPUS alone picks the GPUs
    for bad in ("1b-16bit-single2", "3b-16bit-ddp2", "1b-8bit-ddp2"):
        with pytest.raises(SystemExit):
            multigpu.parse_job(bad)


def test_the_default_schedule_runs_singles_alone_and_the_rest_side_by_side():
    waves = multigpu.parse_schedule(multigpu.default_schedule(4, tiny=False))
    first = [[job.token for lane in wave for job in lane] for wave in waves[:2]]
    assert first == [["1b-16bit-single"], ["8b-4bit-single"]]  # baselines alone
    for wave in waves:
        widths = {job.n for lane in wave for job in lane}
        assert len(widths) == 1 and sum(lane[0].n for lane in wave) <= 4
    tokens = {job.token for wave in waves for lane in wave for job in lane}
    assert {"8b-4bit-ddp4", "1b-16bit-fsdp2", "8b-4bit-model2"} <= tokens
    assert any(len(wave) == 2 for wave in waves)  # two N=2 jobs side by side on 4 GPUs


def metrics(mode: str, peaks: list[dict]) -> dict:
    return {
        "mode": mode,
        "world_size": len(peaks),
        "step_tokens": [16384, 16384, 16384],
        "step_times_s": [0.2, 0.25, 0.4],
        "steady_tokens_per_second": 60000.0,
        "step_time_s": 0.25,
        "steps_measured": 3,
        "time_to_first_step_s": 40.0,
        "peak_memory_gib": peaks,
        "peak_memory_at_load_gib": peaks,
        "peak_host_memory_gib": [3.0] * len(peaks),
        "peak_host_memory_at_load_gib": [2.5] * len(peaks),
        "time_to_model_loaded_s": 30.0,
        "first_loss": 10.4,
        "final_loss": 10.3,
        "trainable_fingerprints": ["a"] * len(peaks),
        "versions": {},
    }


def test_a_ranks_peak_is_read_from_its_own_gpu_and_anything_on_another_is_reported():
    job = multigpu.parse_job("1b-16bit-ddp2")
    peaks = [{"cuda:0": 2.9, "cuda:1": 0.03}, {"cuda:0": 0.0, "cuda:1": 2.8}]
    summary = multigpu.summarize(metrics("ddp", peaks), job, tiny=False)
    assert summary["peak_memory_gib"] == [2.9, 2.8]
    assert summary["allocated_on_other_ranks_gpus_gib"] == 0.03
    assert summary["tokens_per_second"] == 65536.0  # the median step: 16384 tokens in 0.25 s
    assert summary["tokens_per_second_range"] == [40960.0, 81920.0]
    split = multigpu.summarize(metrics("model", [{"cuda:0": 3.3, "cuda:1": 4.3}]), job, tiny=False)
    assert split["peak_memory_gib"] == [3.3, 4.3] and split["allocated_on_other_ranks_gpus_gib"] == 0.0


def test_a_rank_with_a_context_on_another_ranks_gpu_is_not_isolated():
    entry = {"kind": "train", "exit_status": 0, "ran_as": "ddp", "gpu_ids": ["2", "3"], "num_gpus": 2}
    entry |= {"allocated_on_other_ranks_gpus_gib": 0.0, "gpu_contexts_mib": {"0": {"2": 3000.0}, "1": {"3": 2900.0}}}
    multigpu.isolation(entry)
    assert entry["isolated"] and entry["ranks_on_other_gpus"] == {}
    entry["gpu_contexts_mib"]["1"]["2"] = 500.0
    multigpu.isolation(entry)
    assert not entry["isolated"] and entry["ranks_on_other_gpus"] == {"1": ["2"]}


def test_the_big_model_builder_writes_shards_transformers_loads_whole(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    bigmodel.write_weights(config, tmp_path)
    config.save_pretrained(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) == 5  # embeddings, layers 0-3, layers 4-5, final norm, head
    model, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    weights = model.state_dict()
    assert weights["model.layers.5.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert 0.015 < float(weights["model.layers.5.mlp.down_proj.weight"].float().std()) < 0.025
    assert torch.equal(weights["model.norm.weight"], torch.ones(32, dtype=torch.bfloat16))


def test_the_big_schedule_runs_a_model_no_gpu_holds_sharded_then_split_on_the_same_gpus():
    waves = multigpu.parse_schedule(multigpu.big_schedule(4, tiny=False))
    tokens = [[job.token for lane in wave for job in lane] for wave in waves]
    assert tokens == [["70b-16bit-fsdp4"], ["70b-16bit-model4"], ["8b-full-single"], ["8b-full-fsdp4"]]
    tiny = [job.token for wave in multigpu.parse_schedule(multigpu.big_schedule(0, tiny=True)) for job in wave[0]]
    assert tiny == ["tiny-16bit-fsdp2", "tiny-16bit-model2", "tiny-full-single", "tiny-full-fsdp2"]
