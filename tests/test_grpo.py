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
@pytest.mark.parametrize(
    ("processes", "generation"), [("1", "transformers"), ("2", "transformers"), ("1", "continuous_batching")]
)
def test_grpo_trains_and_the_mean_reward_rises(tmp_path, processes, generation):
    override = f"training.grpo.generation={generation}"
    done = run_cli("run", str(TINY), override, cwd=tmp_path, env=clean_env(CPU_PROCESSES=processes))
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((tmp_path / "outputs" / "tiny-grpo" / "metrics.json").read_text())
    assert m["steps"] == 20 and m["world_size"] == int(processes)
    assert m["generation"] == generation  # as TRL's trainer took it
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


# ---- continuous batching (training.grpo.generation: continuous_batching)

# config.json of Qwen3 4B, as the hub serves it (the fields the memory planner reads).
QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}


def continuous(recipe: str = "qwen3-4b-grpo-gsm8k", *overrides: str):
    return catalog.load(recipe, ["training.grpo.generation=continuous_batching", *overrides])


def test_an_unknown_generation_is_refused_naming_the_ones_there_are():
    with pytest.raises(BadInput, match="'auto', 'vllm', 'transformers' or 'continuous_batching'"):
        catalog.load(str(TINY), ["training.grpo.generation=paged"])


def test_the_plan_sizes_the_paged_cache_for_every_completion_of_a_step_and_launches_with_it():
    p = plan_for({"ALLOW_CPU": "1"}, continuous(), [])
    assert p.generation == "continuous_batching"
    # 8 completions a step of up to max_seq_length 1024 tokens each, in blocks of 256 tokens.
    assert p.paged_cache == {"block_size": 256, "num_blocks": 32, "max_batch_tokens": 1024}
    launched = next(text for name, text in p.files.items() if name.endswith("recipe.yaml"))
    assert "generation: continuous_batching" in launched


def test_plan_prints_the_generation_and_the_memory_it_holds(tmp_path):
    args = ("plan", "qwen3-4b-grpo-gsm8k", "training.grpo.generation=continuous_batching")
    done = run_cli(*args, cwd=tmp_path, env=clean_env(ALLOW_CPU="1"))
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("generation"))
    assert line.startswith("generation  continuous_batching (training.grpo.generation); ~")
    assert "a paged KV cache of 32 blocks x 256 tokens, and passes of up to 1024 tokens" in line


@pytest.mark.parametrize("generation", ["transformers", "continuous_batching"])
def test_the_estimate_holds_what_each_generation_allocates(generation):
    recipe = catalog.load("qwen3-4b-grpo-gsm8k", [f"training.grpo.generation={generation}"]).recipe
    est = memory.estimate(recipe, QWEN3_4B, "config.json")
    kv_per_token = 36 * 2 * 8 * 128 * 2  # layers x key and value x KV heads x head_dim x 16 bits
    if generation == "transformers":  # a cache for each of the step's 8 sequences, at max_seq_length
        held = 8 * 1024 * kv_per_token
    else:  # the whole paged cache, and a pass's fp32 logits and 16-bit attention mask over the cache
        held = 32 * 256 * kv_per_token + 1024 * (151936 * 4 + 2560 * 2) + 1024 * (32 * 256 + 1024) * 2
    assert est.generation_gib == round(held / memory.GIB, 2)


@pytest.mark.parametrize(("env", "inventory"), [({}, "1x80"), ({"PARALLELISM": "model", "NUM_GPUS": "2"}, "2x80")])
def test_continuous_batching_is_refused_on_gpus_where_it_was_measured_to_fail(env, inventory):
    with pytest.raises(BadInput, match="does not run on GPUs with Unsloth's model yet .*generation=transformers"):
        plan_for(env, continuous(), gpus.assumed(inventory))
