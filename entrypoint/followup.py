"""The commands after training, `export` and `generate`: find the run, check the request against
it and this machine, and plan ONE process (python -m trainer.export / trainer.generate), which
launch.py then starts like any other plan.

    export RUN_DIR|RECIPE --to adapter|merged_16bit|gguf[:QUANT,...] ... [--no-check]
    generate RUN_DIR|RECIPE [--prompt TEXT] [--image FILE] [--max-new-tokens N] [--temperature T]

A run is named by its output folder or by the recipe that ran (its folder: output.dir, else
OUTPUTS_DIR/<name>). Merging happens on the CPU in 16 bits, so the memory and the disk it needs
are checked here, before anything starts. Pure but for reading the run's folder (recipes/runs.py).
"""

from __future__ import annotations

from pathlib import Path

from entrypoint import memory
from entrypoint.environment import Request
from entrypoint.host import Host
from entrypoint.plan import Plan, child_env
from recipes import catalog, exports
from recipes.errors import BadInput
from recipes.formats import NO_GGUF_WITH_IMAGES
from recipes.runs import Run, folder_of, launch_dir

# Bytes per parameter of each GGUF type (llama.cpp's block sizes), for the disk check.
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.82, "q5_k_m": 0.72, "q5_0": 0.69,
              "q4_k_m": 0.6, "q4_k_s": 0.57, "q4_0": 0.57, "q3_k_m": 0.49, "q2_k": 0.33}  # fmt: skip


def find_run(target: str, request: Request, cwd: str) -> Run:
    """A run's output folder, or the folder the named recipe's run wrote."""
    folder = Path(target).expanduser()
    if not folder.is_dir():
        recipe = catalog.load(target).recipe
        folder = folder_of(recipe, request.outputs_dir, cwd)
        if not folder.is_dir():
            raise BadInput(
                f"recipe {recipe.name} has not run here yet: {str(folder)!r} does not exist; run it first "
                f"(python -m entrypoint run {target}), or give the run's output folder"
            )
    return Run.read(folder.resolve())


def refuse_untrained(run: Run) -> None:
    if run.trained is None and run.checkpoint is None:
        raise BadInput(
            f"run {str(run.folder)!r} has no {run.weights.name}/ and no checkpoint: its training never got to save "
            f"one; train it first (python -m entrypoint run {run.recipe.name})"
        )


def refuse_gguf_of_vision(run: Run) -> None:
    """llama.cpp takes an image-text model as two files (the language model, and the vision tower
    as an mmproj file), which the GGUF export does not make yet."""
    if run.vision:
        raise BadInput(f"export --to gguf of run {run.recipe.name}: it trained a vision model; {NO_GGUF_WITH_IMAGES}")


def check_image(run: Run, image: str | None) -> None:
    if image is None:
        return
    if not run.vision:
        raise BadInput(
            f"--image {image}: run {run.recipe.name} trained a text model (data.format {run.recipe.data.format}), "
            f"which takes no images; leave --image out"
        )
    if not Path(image).is_file():
        raise BadInput(f"--image {image!r} is not a file; give the path of an image (png, jpg, ...)")
    from PIL import Image, UnidentifiedImageError  # PIL only: no torch in the launcher

    try:
        with Image.open(image) as opened:
            opened.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BadInput(f"--image {image!r} is not an image PIL can read ({exc}); give a png, jpg, ... file") from None


def parameters(host: Host) -> int | None:
    """The run's base model's parameter count, from the config.json host.py found for it."""
    shape = memory.Shape.from_config(host.model_config) if host.model_config else None
    return shape.parameters() if shape else None


def export_plan(
    request: Request, run: Run, targets: list[tuple[str, tuple[str, ...]]], host: Host, check: bool = True
) -> Plan:
    refuse_untrained(run)
    kinds = [kind for kind, _ in targets]
    if "gguf" in kinds:
        refuse_gguf_of_vision(run)
    if run.recipe.model.full_finetuning and set(kinds) & {"adapter", "merged_16bit"}:
        raise BadInput(
            f"run {run.recipe.name} fine-tuned every weight: model/ is already the whole 16-bit model, with no "
            f"adapter to merge; export --to gguf converts it"
        )
    quants = [q for kind, qs in targets if kind == "gguf" for q in qs]
    exports.refuse_missing_llama_cpp(
        quants, host.llama_cpp_folder, host.llama_cpp_parts, "export --to gguf asks for", check
    )
    params = parameters(host)
    merging = not run.recipe.model.full_finetuning and bool(set(kinds) & {"merged_16bit", "gguf"})
    if params is not None and merging and host.ram_available_gib is not None:
        needed = memory.merge_memory_gib(params)
        if needed > host.ram_available_gib:
            raise BadInput(
                f"merging {run.recipe.name} loads its {params / 1e9:.1f}B-parameter base in 16 bits on the CPU: "
                f"~{needed} GiB of memory, but {host.ram_available_gib:.1f} GiB is available; export on a machine "
                f"with more memory, or export only the adapter"
            )
    disk = disk_gib(params, targets, merging)
    words = " ".join(f"{kind}:{','.join(q)}" if q else kind for kind, q in targets)
    command = ["-m", "trainer.export", "--run", str(run.folder), "--to", *words.split()]
    command += [] if check else ["--no-check"]
    # Merging and the GGUF tools run on the CPU: no GPU is needed or touched.
    return one_process(request, run, host, command, [], f"export {words}: one process, on the CPU", disk, True)


def disk_gib(params: int | None, targets: list[tuple[str, tuple[str, ...]]], merging: bool) -> float:
    if params is None:
        return 0.1
    per_param = 2.0 if merging else 0.0  # merged_16bit/, or the scratch copy GGUF converts from
    for kind, quants in targets:
        if kind == "gguf":
            per_param += 2.0 + sum(GGUF_BYTES[q] for q in quants)  # the f16 file, then each quantization
    return round(params * per_param / memory.GIB + 0.1, 2)


def generate_plan(request: Request, run: Run, host: Host, options: list[str], image: str | None = None) -> Plan:
    check_image(run, image)
    if image is not None:
        options = [*options, f"--image={Path(image).resolve()}"]
    if run.whole_model is None:
        refuse_untrained(run)
    command = ["-m", "trainer.generate", "--run", str(run.folder), *options]
    where = f"GPUs {','.join(g.id for g in host.gpus)}" if host.gpus else "the CPU"
    return one_process(request, run, host, command, host.gpus, f"generate: one process, on {where}", 0.0, False)


def one_process(
    request: Request, run: Run, host: Host, program: list[str], gpus: list, reason: str, disk: float, writes: bool
) -> Plan:
    """One process on the run's folder: export writes into it (holding its lock), generate only reads."""
    return Plan(
        recipe=str(run.recipe.name),
        recipe_file=str(launch_dir(run.folder)),
        mode="single",
        reason=reason,
        device="cuda" if gpus else "cpu",
        num_processes=1,
        num_machines=1,
        machine_rank=0,
        gpu_ids=[g.id for g in gpus],
        mixed_precision="no",
        device_map="auto" if gpus else "cpu",
        output_dir=str(run.folder),
        accelerate_config=None,
        command=[host.python, *program],
        env=child_env("single", gpus, request.pythonpath),
        env_unset=list(request.consumed),
        memory={},
        disk_gib=disk,
        writes_output=writes,
    )
