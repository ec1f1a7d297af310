"""After training: export a run (merged 16-bit weights, GGUF), the check of each export against the
trained model, try it (`generate`), and what is refused. On the CPU with the smoke recipe; the
evaluation itself is asserted in test_e2e.py.

GGUF files here are what llama.cpp's own converter writes (f16, q8_0), read back with
llama.cpp's gguf-py, written with --no-check: checking a GGUF file takes the compiled
llama-perplexity and llama-completion. llama-quantize (k-quants), the checks of GGUF files and
loading one back into llama.cpp to generate run in the image tests (test_docker.py), where the
pinned llama.cpp is compiled. The merged model's check runs here (transformers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DAMAGE_TOKENIZER, ROOT, clean_env, run_cli, write_recipe

from recipes import exports

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The pinned llama.cpp's converter in this environment (what `make llama-cpp` builds on)."""
    folder = Path(sys.prefix) / "llama.cpp"
    done = subprocess.run(
        [sys.executable, str(ROOT / "requirements" / "llama_cpp.py"), str(folder), "--python-only"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def env_with(llama_cpp: Path, **extra: str) -> dict[str, str]:
    return clean_env(UNSLOTH_LLAMA_CPP_PATH=str(llama_cpp), **extra)


def train(folder: Path, *overrides: str, **env: str) -> Path:
    done = run_cli("run", "smoke", "training.max_steps=10", *overrides, cwd=folder, env=clean_env(**env))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "outputs" / "smoke"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("single"))


def merged_matches_adapter(out: Path) -> None:
    """The merged model computes what the base model with the adapter computes (to bf16 rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = out / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = AutoTokenizer.from_pretrained(adapter)("What is the capital of France?", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_16bit", dtype=torch.float32)
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        got, want = merged(**ids).logits, expected(**ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().mean() + 1e-3


def read_gguf(path: Path, llama_cpp: Path) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(llama_cpp / 'gguf-py')!r}); from gguf import GGUFReader; "
        f"r = GGUFReader({str(path)!r}); f = r.fields; "
        "print(json.dumps({'arch': f['general.architecture'].contents(), 'pre': f['tokenizer.ggml.pre'].contents(), "
        "'tokens': len(f['tokenizer.ggml.tokens'].contents()), "
        "'types': sorted({t.tensor_type.name for t in r.tensors}), 'tensors': len(r.tensors)}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_export_writes_a_merged_model_and_gguf_files_and_records_them(single_run, llama_cpp):
    done = run_cli("export", str(single_run), "--to", "merged_16bit", "gguf:q8_0,f16", "--no-check", cwd=single_run,
                   env=env_with(llama_cpp))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    merged_matches_adapter(single_run)
    q8, f16 = (single_run / "gguf" / f"smoke-{q}.gguf" for q in ("q8_0", "f16"))
    # "gpt-2": the random-init tokenizer's pre-tokenizer, by the name llama.cpp's runtime knows.
    expected = {"arch": "llama", "pre": "gpt-2", "tokens": 384, "types": ["F32", "Q8_0"], "tensors": 21}
    assert read_gguf(q8, llama_cpp) == expected
    assert read_gguf(f16, llama_cpp)["types"] == ["F16", "F32"]
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    recorded = json.loads((single_run / "exports.json").read_text())
    assert [(r["kind"], Path(r["path"]).name) for r in recorded] == [
        ("merged_16bit", "merged_16bit"),
        ("gguf", "smoke-q8_0.gguf"),
        ("gguf", "smoke-f16.gguf"),
    ]
    assert not list(single_run.glob(".export-*")) and not list(single_run.glob(".*.tmp-*")), "no scratch is left"


def record_of(run: Path, name: str) -> dict:
    (record,) = [r for r in json.loads((run / "exports.json").read_text()) if Path(r["path"]).name == name]
    return record


def test_the_merged_export_checks_itself_against_the_trained_model_on_the_runs_evaluation_rows(single_run):
    done = run_cli("export", str(single_run), "--to", "merged_16bit", cwd=single_run)
    assert done.returncode == 0, done.stderr[-3000:]
    check = record_of(single_run, "merged_16bit")["check"]
    assert check["ok"] is True and "checked: perplexity ratio" in done.stdout
    assert (check["rows"], check["rows_from"]) == (9, "the run's evaluation rows (data.eval_fraction 0.1)")
    assert abs(check["ratio"] - 1) <= exports.CHECK_TOLERANCE["merged_16bit"]
    assert check["ratio"] == pytest.approx(check["perplexity"] / check["trained_perplexity"], abs=1e-3)
    assert check["prompts_rendered_as_trained"] == "4/4"


def test_a_merged_export_whose_tokenizer_is_damaged_fails_its_check_with_exit_1_naming_it(single_run, tmp_path):
    """The export's own process, its merge damaging the tokenizer it saves (conftest.DAMAGE_TOKENIZER)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(single_run, run, ignore=shutil.ignore_patterns("merged_16bit", "gguf", "exports.json"))
    damaging = DAMAGE_TOKENIZER + (
        "import sys\nfrom trainer import export\nmerge = export.merge\n"
        "def damaged(run, adapter, dest):\n    merge(run, adapter, dest)\n"
        "    reverse_ordinary_ids(dest / 'tokenizer.json')\n    return dest\n"
        "export.merge = damaged\nsys.exit(export.main(sys.argv[1:]))\n"
    )
    done = subprocess.run([sys.executable, "-c", damaging, "--run", str(run), "--to", "merged_16bit"], cwd=tmp_path,
                          env=clean_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("export check failed:")]
    assert line.startswith("export check failed: merged_16bit merged_16bit: perplexity ")
    assert "vs the trained model's" in line and "prompts rendered as in training: 0/4" in line
    assert record_of(run, "merged_16bit")["check"]["ok"] is False
    assert (run / "merged_16bit" / "model.safetensors").is_file(), "the export stays, for a look"


def test_no_check_exports_without_llama_cpps_checking_tools_and_records_the_check_as_skipped(single_run, llama_cpp):
    done = run_cli("export", str(single_run), "--to", "gguf:f16", "--no-check", cwd=single_run, env=env_with(llama_cpp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (llama_cpp / "llama-perplexity").exists(), "the converter alone: nothing to check with"
    assert record_of(single_run, "smoke-f16.gguf")["check"] == {"skipped": "--no-check"}
    assert "not checked (--no-check)" in done.stdout


def test_a_recipe_name_finds_its_run_folder(single_run, llama_cpp):
    done = run_cli("export", "smoke", "--to", "adapter", cwd=single_run.parent.parent, env=env_with(llama_cpp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"exported adapter: {single_run / 'adapter'}" in done.stdout


def test_a_ddp_run_exports_after_training(tmp_path, llama_cpp):
    out = train(tmp_path, CPU_PROCESSES="2", PARALLELISM="ddp")
    done = run_cli("export", str(out), "--to", "merged_16bit", cwd=tmp_path, env=env_with(llama_cpp))
    assert done.returncode == 0, done.stderr[-3000:]
    merged_matches_adapter(out)


def test_an_fsdp_run_merges_at_the_end_of_training_as_its_recipe_asks(tmp_path):
    out = train(tmp_path, "output.save=[adapter,merged_16bit]", CPU_PROCESSES="2", PARALLELISM="fsdp")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "fsdp" and metrics["exported"] == [str(out / "merged_16bit")]
    merged_matches_adapter(out)
    assert record_of(out, "merged_16bit")["check"]["ok"] is True, "checked at the end of training too"


def test_a_stopped_runs_newest_checkpoint_exports_as_its_adapter(tmp_path, llama_cpp):
    out = train(tmp_path, "output.save_steps=5")
    checkpoint_adapter = out / "checkpoints" / "checkpoint-10" / "adapter_model.safetensors"
    (out / "adapter" / "adapter_model.safetensors").unlink()
    (out / "adapter" / "adapter_config.json").unlink()  # as if training had stopped after step 10
    done = run_cli("export", str(out), "--to", "adapter", cwd=tmp_path, env=env_with(llama_cpp))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == checkpoint_adapter.read_bytes()


def test_generate_answers_a_prompt_with_the_trained_model(single_run):
    done = run_cli("generate", str(single_run), "--prompt", "What is the capital of France?", "--max-new-tokens",
                   "8", cwd=single_run)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() != ""


def test_generate_without_a_prompt_chats_on_stdin_until_an_empty_line(single_run):
    done = subprocess.run(
        [sys.executable, "-m", "entrypoint", "generate", str(single_run), "--max-new-tokens", "4"],
        input="Hello\nAnd then?\n\nnever read\n",
        cwd=single_run,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: ") == 2


# ---- refused before anything loads: one error line, exit 2, nothing written


def fake_run(folder: Path, base_params_b: float, full: bool = False) -> Path:
    """A run folder whose base model claims `base_params_b` billion parameters (no weights at all)."""
    base = folder / "base"
    base.mkdir(parents=True)
    hidden = 8192
    layers = max(1, int(base_params_b * 1e9 / (12 * hidden * hidden)))
    config = {"vocab_size": 32000, "hidden_size": hidden, "intermediate_size": 4 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 64}  # fmt: skip
    (base / "config.json").write_text(json.dumps(config))
    run = folder / "run"
    (run / "launch").mkdir(parents=True)
    recipe = f"name: fake\nmodel: {{name: {base}, load_in: 16bit, full_finetuning: {str(full).lower()}}}\n"
    recipe += "lora: null\n" if full else ""
    (run / "launch" / "recipe.yaml").write_text(recipe + "data: {source: org/data}\n")
    trained = run / ("model" if full else "adapter")
    trained.mkdir()
    if full:
        (trained / "config.json").write_text(json.dumps(config))
    else:
        (trained / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return run


def listing(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize(
    ("make", "to", "message"),
    [
        (lambda tmp: tmp, ["merged_16bit"], "is not a run's output folder (no launch/recipe.yaml in it)"),
        (lambda tmp: fake_run(tmp, 0.1), ["gguf:q7_k"], "'q7_k' is not a GGUF quantization"),
        (lambda tmp: fake_run(tmp, 0.1), ["merged"], "'merged' is not an export (did you mean 'merged_16bit'?)"),
        (lambda tmp: fake_run(tmp, 0.1, full=True), ["merged_16bit"], "model/ is already the whole 16-bit model"),
        (lambda tmp: fake_run(tmp, 2000), ["merged_16bit"], "GiB of memory, but"),
        (lambda tmp: fake_run(tmp, 2000, full=True), ["gguf:q8_0", "--no-check"], "GiB free but the run will write"),
    ],
)
def test_an_impossible_export_is_refused_with_the_value_and_the_fix(tmp_path, llama_cpp, make, to, message):
    target = make(tmp_path)
    before = listing(tmp_path)
    done = run_cli("export", str(target), "--to", *to, cwd=tmp_path, env=env_with(llama_cpp))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] != []
    assert listing(tmp_path) == before, "nothing is written"


def test_an_export_of_a_run_that_never_saved_is_refused(tmp_path, llama_cpp):
    run = fake_run(tmp_path, 0.1)
    for file in (run / "adapter").iterdir():
        file.unlink()
    done = run_cli("export", str(run), "--to", "merged_16bit", cwd=tmp_path, env=env_with(llama_cpp))
    assert done.returncode == 2 and "has no adapter/ and no checkpoint" in done.stderr


def test_a_k_quant_without_a_built_llama_quantize_is_refused_naming_make_llama_cpp(tmp_path, llama_cpp):
    converter_only = tmp_path / "converter-only"
    for part in ("convert_hf_to_gguf.py", "gguf-py"):
        (converter_only / part).parent.mkdir(parents=True, exist_ok=True)
        (converter_only / part).symlink_to(llama_cpp / part)
    run = fake_run(tmp_path, 0.1)
    done = run_cli("export", str(run), "--to", "gguf:q4_k_m", cwd=tmp_path, env=env_with(converter_only))
    assert done.returncode == 2 and "a built llama-quantize is not in llama.cpp folder" in done.stderr
    assert "make llama-cpp" in done.stderr


def test_a_gguf_export_that_cannot_be_checked_here_is_refused_naming_the_tools_and_no_check(tmp_path, llama_cpp):
    run = fake_run(tmp_path, 0.1)
    done = run_cli("export", str(run), "--to", "gguf:q8_0", cwd=tmp_path, env=env_with(llama_cpp))
    assert done.returncode == 2 and "the built llama-perplexity and llama-completion" in done.stderr
    assert "make llama-cpp" in done.stderr and "export --no-check" in done.stderr
    assert not (run / "gguf").exists() and not (run / "exports.json").exists()


def test_a_recipe_that_has_not_run_yet_is_named(tmp_path):
    recipe = write_recipe(tmp_path, "later", "allow_cpu: true\nmodel: {name: org/m-1B}\ndata: {source: org/d}\n")
    done = run_cli("generate", str(recipe), "--prompt", "hi", cwd=tmp_path)
    assert done.returncode == 2 and "recipe later has not run here yet" in done.stderr


@pytest.mark.parametrize(
    ("asked", "recorded", "merged_into"),
    [
        ("unsloth/gemma-3-4b-it", "unsloth/gemma-3-4b-it-unsloth-bnb-4bit", "unsloth/gemma-3-4b-it"),
        ("unsloth/Llama-3.1-8B", "unsloth/Llama-3.1-8B-bnb-4bit", "unsloth/Llama-3.1-8B"),
        ("unsloth/Llama-3.1-8B-bnb-4bit", "unsloth/Llama-3.1-8B-bnb-4bit", "unsloth/Llama-3.1-8B-bnb-4bit"),
        ("unsloth/Llama-3.1-8B", "unsloth/Llama-3.1-8B", "unsloth/Llama-3.1-8B"),
    ],
)
def test_a_4bit_run_of_a_hub_model_merges_into_the_16bit_model_its_recipe_named(tmp_path, asked, recorded, merged_into):
    """Unsloth loads a hub model asked for in 4 bits from its pre-quantized copy, which PEFT records
    as the base; the 16-bit weights to merge into are the recipe's model's. A recipe that named the
    pre-quantized copy itself has none (and the merge says so)."""
    from recipes import catalog
    from recipes.runs import Run

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": recorded}))
    recipe = catalog.load("llama-3.1-8b-qlora-chat", [f"model.name={asked}"]).recipe
    assert Run(tmp_path, recipe).merge_base() == merged_into
