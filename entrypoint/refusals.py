"""What a run cannot do here, refused before launch: every refusal of a training request that is not
decide.py's (which mode, on which GPUs), in one place, as named steps that plan.make calls once,
once the mode is known:

  gguf_without_llama_cpp    output.save asks for GGUF, and llama.cpp is not built here
  fsdp_switch_by_hand       UNSLOTH_FSDP2 set by hand under a mode that is not fsdp
  format_or_method_in_mode  a data format or a method that cannot train in the chosen mode
  images_for_a_text_model   data.format vision on a model whose config.json has no vision tower
  quantized_images_on_cpu   an image-text model loaded in 4 or 8 bits on the CPU
  generation_unavailable    training.grpo.generation names what cannot run here (vLLM; continuous
                            batching on GPUs)
  paged_cache_across_gpus   continuous batching with the model split over several GPUs

Each is a BadInput naming the value and the fix. The training program, which can be started by
hand, checks again what it can check alone (trainer/program.py's prepare). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from entrypoint import memory
from entrypoint.environment import Request
from entrypoint.host import Host
from recipes import exports, modes
from recipes.errors import BadInput
from recipes.formats import refuse_quantized_images_on_cpu
from recipes.modes import Mode
from recipes.schema import Recipe


def check(request: Request, recipe: Recipe, host: Host, mode: Mode, gpus: int) -> None:
    """`gpus`: how many GPUs the chosen mode runs on (0: the CPU)."""
    gguf_without_llama_cpp(recipe, host)
    modes.refuse_fsdp_switch(mode, request.fsdp_switch)
    format_or_method_in_mode(recipe, mode)
    images_for_a_text_model(recipe, host.model_config, host.model_config_source)
    refuse_quantized_images_on_cpu(recipe.vision, recipe.model.load_in, gpus > 0)
    generation_unavailable(recipe, gpus > 0, host.vllm_installed)
    continuous_batching_on_gpus(recipe, gpus)


def gguf_without_llama_cpp(recipe: Recipe, host: Host) -> None:
    quants = recipe.output.gguf_quants
    exports.refuse_missing_llama_cpp(
        quants, host.llama_cpp_folder, host.llama_cpp_parts, "output.save asks for gguf", recipe.output.check
    )


def format_or_method_in_mode(recipe: Recipe, mode: Mode) -> None:
    """A data format or a method that cannot train in this mode (the tables of recipes/formats.py
    and recipes/methods.py)."""
    refused = recipe.refused_in(mode)
    if refused is not None:
        what, why = refused
        raise BadInput(
            f"{what} cannot train under PARALLELISM={mode}: {why}; use PARALLELISM=ddp (one whole model per "
            f"GPU), or model for a model too big for one GPU"
        )


def images_for_a_text_model(recipe: Recipe, config: Mapping | None, source: str) -> None:
    """data.format vision on a model whose config.json has no vision tower (where it was found)."""
    if not recipe.vision or config is None or recipe.model.random_init is not None:
        return
    if not memory.takes_images(config):
        raise BadInput(
            f"data.format vision, but {recipe.model.name} is a text-only model ({source} names no vision tower: "
            f"no vision_config); "
            f"pick an image-text model (e.g. unsloth/Qwen2.5-VL-7B-Instruct), or train on text with "
            f"data.format messages"
        )


def generation_unavailable(recipe: Recipe, gpu: bool, vllm: bool) -> None:
    grpo = recipe.training.grpo
    if grpo is not None and grpo.generation == "vllm" and not (gpu and vllm):
        raise BadInput(
            f"training.grpo.generation=vllm, but vLLM {'is not installed here' if not vllm else 'needs a GPU'}; "
            f"set training.grpo.generation=auto (vLLM where it can run, else transformers) or transformers"
        )


def continuous_batching_on_gpus(recipe: Recipe, gpus: int) -> None:
    """Measured on an H200 (docs/benchmarks/grpo-h200.md): with Unsloth's patched model, transformers'
    continuous batching (5.17) fails at its first generation. Its engine asks for the logits of the
    positions it samples as a tensor `logits_to_keep`, which Unsloth's fast forward ignores
    (unsloth/models/llama.py: every position's logits come back), and the model TRL casts to bf16
    for it meets float32 inputs. On the CPU it runs (stock transformers there)."""
    grpo = recipe.training.grpo
    if grpo is not None and grpo.generation == "continuous_batching" and gpus > 0:
        raise BadInput(
            "training.grpo.generation=continuous_batching does not run on GPUs with Unsloth's model yet (measured: "
            "transformers' continuous batching fails at its first generation there, see docs/benchmarks/grpo-h200.md); "
            "set training.grpo.generation=transformers (Unsloth's fast generate), the measured default"
        )
