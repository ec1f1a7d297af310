"""GRPO (`training.method: grpo`): completions of prompts, scored by reward functions. The bundled
rewards, what is refused before anything loads, the plan, and real training on the CPU, where a
tiny random-init model learns a reward from a file of our own (tests/data/rewards.py) in one
process and in two-process DDP (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, plan_for, run_cli, write_recipe

from entrypoint import gpus, memory
from recipes import catalog, rewards
from recipes.errors import BadInput

TINY = ROOT / "tests" / "recipes" / "tiny-grpo.yaml"


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---- the bundled rewards


def test_answer_tags_rewards_exactly_one_answer_block():
    completions = [chat("<think>2+2</think><answer>4</answer>"), chat("4"), "<answer>1</answer><answer>2</answer>"]
    assert rewards.answer_tags(completions) == [1.0, 0.0, 0.0]


def test_numeric_answer_compares_the_answer_blocks_number_with_gsm8ks():
    completions = [chat("<answer>1,234</answer>"), chat("so it is 72"), chat("<answer>71</answer>"), chat("none")]
    answers = ["... #### 1234", "Natalia sold 48/2 = 24 clips ... #### 72", "#### 72", "#### 5"]
    assert rewards.numeric_answer(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]


def test_brevity_falls_with_the_completions_length():
    assert rewards.brevity(["", "x" * 500, "x" * 5000]) == [1.0, 0.5, 0.0]


# ---- refused before anything loads


def grpo_recipe(tmp_path: Path, grpo: str, **extra: str) -> Path:
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "Say a", "answer": "a"}) + "\n")
    text = (
        "allow_cpu: true\nmodel: {name: org/m-1B, load_in: 16bit, max_seq_length: 512}\n"
        f"data: {{source: {rows}, format: prompt}}\n"
        f"training:\n  method: grpo\n  per_device_batch_size: {extra.get('batch', '4')}\n"
        f"  gradient_accumulation_steps: 1\n  grpo: {grpo}\n"
    )
    return write_recipe(tmp_path, "g", text)


@pytest.mark.parametrize(
    ("grpo", "files", "message"),
    [
        (
            "{rewards: [answer_tag]}",
            {},
            r"'answer_tag', which is not a bundled reward \(did you mean 'answer_tags'\?\)",
        ),
        ("{rewards: [mine]}", {}, "or define mine in a file named by training.grpo.reward_file"),
        (
            "{rewards: [mine], reward_file: r.py}",
            {"r.py": "def other(completions, **kw):\n    return []\n"},
            r"reward_file '.*r.py' defines no function 'mine' \(it defines: other\)",
        ),
        ("{rewards: [mine], reward_file: r.py}", {"r.py": "def mine(:\n"}, "is not valid Python at line 1"),
        ("{rewards: [mine], reward_file: gone.py}", {}, "reward_file 'gone.py' cannot be read"),
        ("{rewards: [brevity], num_generations: 3}", {}, "4 completions per step on each process, which must be whole"),
        ("{rewards: [brevity], max_completion_length: 512}", {}, "leaves no room for the prompt"),
        ("{rewards: [brevity, brevity]}", {}, r"rewards \['brevity'\] are named twice"),
    ],
)
def test_an_impossible_grpo_recipe_is_refused_naming_the_field_and_the_fix(tmp_path, grpo, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BadInput, match=message):
        catalog.load(str(grpo_recipe(tmp_path, grpo)))


def test_grpo_without_its_section_says_which_fields_it_needs():
    with pytest.raises(BadInput, match="training.method grpo needs its section training.grpo with rewards"):
        catalog.load(str(TINY), ["training.grpo=null"])


def test_the_reward_file_is_checked_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n\ndef mine(completions, **kw):\n    return []\n"
    (tmp_path / "r.py").write_text(code)
    catalog.load(str(grpo_recipe(tmp_path, "{rewards: [mine], reward_file: r.py}")))
    assert not marker.exists(), "loading a recipe never runs the user's reward code"


# ---- the plan


def test_grpo_is_refused_under_fsdp_before_launch():
    with pytest.raises(BadInput, match="training.method grpo cannot train under PARALLELISM=fsdp"):
        plan_for({"PARALLELISM": "fsdp"}, catalog.load("qwen3-4b-grpo-gsm8k"), gpus.assumed("2x80"))


def test_the_plan_shows_and_writes_the_generation_backend_it_chose():
    p = plan_for({"PARALLELISM": "ddp"}, catalog.load("qwen3-4b-grpo-gsm8k"), gpus.assumed("2x80"))
    assert p.generation == "transformers"  # vLLM is not installed here
    launched = next(text for name, text in p.files.items() if name.endswith("recipe.yaml"))
    assert "generation: transformers" in launched


def test_vllm_asked_for_where_it_is_not_installed_is_refused():
    loaded = catalog.load("qwen3-4b-grpo-gsm8k", ["training.grpo.generation=vllm"])
    with pytest.raises(BadInput, match="training.grpo.generation=vllm, but vLLM is not installed here"):
        plan_for({}, loaded, gpus.assumed("1x80"))


def test_the_memory_estimate_counts_grpos_generation_cache():
    grpo = catalog.load(str(TINY), ["model.max_seq_length=2048", "training.grpo.max_completion_length=512"]).recipe
    same_batch_sft = catalog.load("smoke", ["model.max_seq_length=2048", "training.per_device_batch_size=8"]).recipe
    grpo_est = memory.estimate_from_shape(grpo, memory.Shape.from_random_init(grpo.model.random_init), "shape")
    sft_est = memory.estimate_from_shape(same_batch_sft, memory.Shape.from_random_init(grpo.model.random_init), "shape")
    assert grpo_est.activations_gib > sft_est.activations_gib


# ---- training on the CPU


@pytest.mark.e2e
@pytest.mark.parametrize("processes", ["1", "2"])
def test_grpo_trains_and_the_mean_reward_rises(tmp_path, processes):
    done = run_cli("run", str(TINY), cwd=tmp_path, env=clean_env(CPU_PROCESSES=processes))
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "outputs" / "tiny-grpo" / "metrics.json").read_text())
    assert m["steps"] == 20 and m["world_size"] == int(processes)
    rewards_by_step = [reward for _, reward in m["rewards"]]
    first, last = sum(rewards_by_step[:3]) / 3, sum(rewards_by_step[-3:]) / 3
    assert last > first + 0.15, rewards_by_step  # the letter a's share of each completion grows
    assert len(set(m["trainable_fingerprints"])) == 1 and m["tokens"] > 0


def test_a_grpo_model_known_only_by_its_name_is_estimated_with_its_generation_cache():
    grpo = catalog.load("qwen3-4b-grpo-gsm8k").recipe
    sft = catalog.load("qwen3-4b-grpo-gsm8k", ["training.method=sft", "training.grpo=null", "data.format=messages"])
    with_cache, without = memory.estimate(grpo), memory.estimate(sft.recipe)
    assert with_cache.source == without.source == "model name 'unsloth/Qwen3-4B'"
    assert with_cache.activations_gib > without.activations_gib
