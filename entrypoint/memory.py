"""Per-GPU memory of a recipe: when one GPU holds the whole model, and in each mode.

Two levels of detail:
- from the model's config.json (a random-init shape, or what entrypoint/host.py found in a local
  model folder, the Hugging Face cache or the hub, handed in as data: this module reads nothing,
  so planning stays pure and offline): embeddings
  in 16 bits, every linear layer at its load type, LoRA's exact trainable parameters for the
  recipe's rank and target modules, activations from the hidden size;
- otherwise from the parameter count (`model.size_b`, or the name: "Llama-3.1-8B" -> 8,
  "Mixtral-8x7B" -> 56) with average bytes per parameter.
The constants are fitted to Unsloth's peaks measured on one H100 (docs/benchmarks/memory.md
compares the two); the CUDA context is added on top for the "does it fit" decision.
`per_gpu_gib` turns the one-GPU estimate into each mode's share, by the rule the mode table
(recipes/modes.py) names for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

from recipes import methods
from recipes.modes import SPECS, Mode
from recipes.schema import TINY_VISION_TOWER, VISION_ARCHITECTURES, RandomInit, Recipe

GIB = 1024**3

# Bytes per parameter of the frozen (or, for full fine-tuning, trained) weights.
WEIGHT_BYTES = {"4bit": 0.6, "8bit": 1.1, "16bit": 2.0}
# LoRA's trainable share of the model at rank 16 on all linear layers, and bytes per trainable
# parameter (16-bit weight + grad + fp32 AdamW moments + fp32 master copy).
LORA_SHARE_AT_R16 = 0.0075
TRAINABLE_BYTES = 16.0
FULL_FT_EXTRA_BYTES = {"adamw_8bit": 4.0, "paged_adamw_8bit": 4.0}  # grads + 8-bit moments
FULL_FT_EXTRA_DEFAULT = 10.0  # grads + fp32 moments
# Activations per token with Unsloth's offloaded gradient checkpointing, at 1.1B parameters;
# they grow with the hidden size, roughly the square root of the parameter count.
ACTIVATION_BYTES_PER_TOKEN_1B = 100_000
# From config.json: bytes per linear weight (nf4 + double-quantised constants; int8 + scales).
LINEAR_BYTES = {"4bit": 0.53, "8bit": 1.03, "16bit": 2.0}
# Activations per token per unit of hidden size, with Unsloth's offloaded checkpointing.
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 56
KV_BYTES = 2  # a 16-bit key or value element of the generation cache (GRPO)
# Known only by its parameter count: the generation cache per token of an 8B model (32 layers x 8
# KV heads x 128 x key and value x 16 bits, Llama 3.1 8B's), growing like the activations.
KV_BYTES_PER_TOKEN_8B = 32 * 8 * 128 * 2 * KV_BYTES
CUDA_OVERHEAD_GIB = 1.0  # context, cuBLAS workspace, allocator slack
MERGE_MEMORY_FACTOR = 1.3  # a merge holds the 16-bit model and, while saving, about a third more
USABLE_FRACTION = 0.92  # never plan to fill a GPU to the last byte
# Unsloth's native FSDP2 keeps the frozen weights replicated and shards only the trainable state
# while the model takes at most this share of one GPU (its "fit" layout: plan_fsdp2_layout in
# unsloth/models/fsdp2_perf.py); a larger model has every weight sharded and gathers one block
# around its forward and backward, prefetching the next.
FSDP_FIT_FRACTION = 0.4
FSDP_GATHERED_BLOCKS = 2
DEFAULT_LAYERS = 32  # blocks of a model known only by its parameter count

SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")


@dataclass(frozen=True)
class Estimate:
    params_b: float | None  # None: unknown (the name does not say and size_b is unset)
    weights_gib: float
    trainable_gib: float
    activations_gib: float
    total_gib: float  # per GPU when the whole model sits on one GPU
    source: str  # where the parameter count came from
    layers: int | None = None  # decoder blocks, when config.json says
    embeddings_gib: float = 0.0  # the 16-bit embeddings and output head (within weights_gib), when known
    quantized: bool = False  # bitsandbytes weights (4- or 8-bit): loaded whole by every process
    generation_gib: float = 0.0  # grpo: the part of activations_gib that generating the completions holds

    def as_dict(self) -> dict[str, float | str | None]:
        return asdict(self)


def params_from_name(name: str) -> float | None:
    """Billions of parameters from a model name, or None."""
    for match in SIZE_IN_NAME.finditer(name.rsplit("/", 1)[-1]):
        experts, size, unit = match.groups()
        value = float(size) * (int(experts) if experts else 1)
        return value / 1000 if unit in "Mm" else value
    return None


def parameter_count_b(recipe: Recipe) -> tuple[float | None, str]:
    model = recipe.model
    if model.size_b is not None:
        return model.size_b, "model.size_b"
    from_name = params_from_name(model.name)
    if from_name is not None:
        return from_name, f"model name {model.name!r}"
    return None, "unknown (set model.size_b)"


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a decoder's config.json."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    experts: int = 1
    vision: tuple[int, int, int] | None = None  # an image-text model's tower: hidden, intermediate, layers

    @classmethod
    def from_config(cls, config: Mapping) -> Shape | None:
        tower = vision_tower(config)
        config = config.get("text_config", config)  # multimodal wrappers keep the decoder inside
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                vocab=int(config["vocab_size"]),
                hidden=hidden,
                intermediate=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                tied=bool(config.get("tie_word_embeddings", False)),
                experts=int(config.get("num_local_experts") or config.get("num_experts") or 1),
                vision=tower,
            )
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def from_random_init(cls, spec: RandomInit) -> Shape:
        return cls(
            vocab=spec.vocab_size,
            hidden=spec.hidden_size,
            intermediate=spec.intermediate_size,
            layers=spec.num_hidden_layers,
            heads=spec.num_attention_heads,
            kv_heads=spec.kv_heads,
            head_dim=spec.hidden_size // spec.num_attention_heads,
            tied=False,  # random_model builds untied heads
            vision=vision_tower({"vision_config": TINY_VISION_TOWER})
            if spec.architecture in VISION_ARCHITECTURES
            else None,
        )

    def parameters(self) -> int:
        """Embeddings and linear layers, the vision tower's included (norms are a rounding error)."""
        return self.embedding_params() + self.linear_params()

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Per layer: module -> (in, out, copies)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        e = self.experts
        return {
            "q_proj": (self.hidden, q, 1),
            "k_proj": (self.hidden, kv, 1),
            "v_proj": (self.hidden, kv, 1),
            "o_proj": (q, self.hidden, 1),
            "gate_proj": (self.hidden, self.intermediate, e),
            "up_proj": (self.hidden, self.intermediate, e),
            "down_proj": (self.intermediate, self.hidden, e),
        }

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def linear_params(self) -> int:
        return self.layers * sum(i * o * c for i, o, c in self.linears().values()) + self.vision_params()

    def vision_params(self) -> int:
        """The vision tower's linear layers: attention (4 square) and an MLP (2) per block."""
        if self.vision is None:
            return 0
        hidden, intermediate, layers = self.vision
        return layers * (4 * hidden * hidden + 2 * hidden * intermediate)

    def vision_lora_params(self, r: int) -> int:
        if self.vision is None:
            return 0
        hidden, intermediate, layers = self.vision
        return layers * r * (4 * 2 * hidden + 2 * (hidden + intermediate))

    def lora_params(self, r: int, targets: list[str]) -> int:
        per_layer = sum(r * (i + o) * c for name, (i, o, c) in self.linears().items() if name in targets)
        # embed_tokens / lm_head in the targets are trained in full (Unsloth's modules_to_save).
        full = self.vocab * self.hidden * sum(1 for name in ("embed_tokens", "lm_head") if name in targets)
        return self.layers * per_layer + full


def vision_tower(config: Mapping) -> tuple[int, int, int] | None:
    """(hidden, intermediate, layers) of config.json's vision_config, or None where it does not
    say (or there is none). Qwen2-VL's embed_dim is the tower's width (its hidden_size there is
    the language model's); elsewhere hidden_size is."""
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        return None
    try:
        hidden = int(vision.get("embed_dim") or vision["hidden_size"])
        ratio = vision.get("mlp_ratio") or 4
        intermediate = int(vision.get("intermediate_size") or ratio * hidden)
        layers = int(vision.get("num_hidden_layers") or vision.get("depth") or vision["num_layers"])
    except (KeyError, TypeError, ValueError):
        return None
    return hidden, intermediate, layers


def takes_images(config: Mapping) -> bool:
    """Whether config.json describes an image-text model: a vision_config, or another key of a
    vision tower or image token (Phi-3.5-vision's img_processor, LLaVA's mm_vision_tower, ...)."""
    words = ("vision", "visual", "image", "img")
    return any(word in key for key in config for word in words) or any(
        word in key for key in config.get("text_config") or {} for word in words
    )


def shape_of(recipe: Recipe, config: Mapping | None, source: str) -> tuple[Shape | None, str]:
    """The decoder's shape: the recipe's random-init one, else config.json (found by host.py)."""
    spec = recipe.model.random_init
    if spec is not None:
        return Shape.from_random_init(spec), "random_init shape"
    shape = Shape.from_config(config) if config else None
    return shape, (source if shape else "")


def estimate_from_shape(recipe: Recipe, shape: Shape, source: str) -> Estimate:
    model, training = recipe.model, recipe.training
    embeddings, linears = shape.embedding_params(), shape.linear_params()
    params = shape.parameters()
    if model.full_finetuning:
        weights = params * WEIGHT_BYTES["16bit"]
        trainable = params * FULL_FT_EXTRA_BYTES.get(training.optimizer, FULL_FT_EXTRA_DEFAULT)
    else:
        assert recipe.lora is not None
        weights = embeddings * WEIGHT_BYTES["16bit"] + linears * LINEAR_BYTES[model.load_in]
        trainable = shape.lora_params(recipe.lora.r, recipe.lora.target_modules) * TRAINABLE_BYTES
        if recipe.lora.finetune_vision_layers:
            trainable += shape.vision_lora_params(recipe.lora.r) * TRAINABLE_BYTES
    # Image tokens sit in the sequence beside the text, so max_seq_length bounds both.
    tokens = training.per_device_batch_size * model.max_seq_length
    activations = tokens * shape.hidden * ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN
    kv_per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim * KV_BYTES
    generation = generation_bytes(recipe, kv_per_token, shape.vocab, shape.hidden)
    est = _estimate(
        recipe, params / 1e9, weights, trainable, activations + generation, source, shape.layers, generation
    )
    return replace(est, embeddings_gib=round(embeddings * WEIGHT_BYTES["16bit"] / GIB, 2))


def generation_bytes(recipe: Recipe, kv_per_token: float, vocab: int | None = None, hidden: int | None = None) -> float:
    """GRPO generates each step's completions before it trains on them, with a 16-bit KV cache: transformers'
    generate (and vLLM) for every sequence of the call at max_seq_length; continuous batching its paged cache,
    allocated whole, and for each pass of its engine the fp32 logits of max_batch_tokens tokens and, with sdpa
    attention, their 16-bit mask over the cache (left out where the vocabulary is unknown)."""
    grpo = recipe.training.grpo
    if grpo is None:
        return 0.0
    if grpo.generation != "continuous_batching":
        return methods.generated_sequences(recipe) * recipe.model.max_seq_length * kv_per_token
    cache = methods.paged_cache(recipe)
    passes = 0.0
    if vocab is not None and hidden is not None:
        batch = cache.max_batch_tokens
        passes = batch * (vocab * 4 + hidden * KV_BYTES) + batch * (cache.tokens + batch) * KV_BYTES
    return cache.tokens * kv_per_token + passes


def _estimate(
    recipe: Recipe,
    params_b: float,
    weights: float,
    trainable: float,
    activations: float,
    source: str,
    layers: int | None = None,
    generation: float = 0.0,
) -> Estimate:
    total = (weights + trainable + activations) / GIB + CUDA_OVERHEAD_GIB
    return Estimate(
        params_b=round(params_b, 4),
        weights_gib=round(weights / GIB, 2),
        trainable_gib=round(trainable / GIB, 2),
        activations_gib=round(activations / GIB, 2),
        total_gib=round(total, 2),
        source=source,
        layers=layers,
        quantized=recipe.model.load_in != "16bit",
        generation_gib=round(generation / GIB, 2),
    )


def estimate(recipe: Recipe, config: Mapping | None = None, config_source: str = "") -> Estimate:
    """`config`: the model's config.json as entrypoint/host.py found it (None: the name or size_b)."""
    shape, source = shape_of(recipe, config, config_source)
    if shape is not None:
        return estimate_from_shape(recipe, shape, source)
    params_b, source = parameter_count_b(recipe)
    if params_b is None:
        return Estimate(None, 0.0, 0.0, 0.0, 0.0, source)
    params = params_b * 1e9
    model, training = recipe.model, recipe.training
    weights = params * WEIGHT_BYTES[model.load_in]
    if model.full_finetuning:
        trainable = params * FULL_FT_EXTRA_BYTES.get(training.optimizer, FULL_FT_EXTRA_DEFAULT)
    else:
        assert recipe.lora is not None
        trainable = params * LORA_SHARE_AT_R16 * (recipe.lora.r / 16) * TRAINABLE_BYTES
    tokens = training.per_device_batch_size * model.max_seq_length
    activations = tokens * ACTIVATION_BYTES_PER_TOKEN_1B * math.sqrt(max(params_b, 0.001) / 1.1)
    # As estimate_from_shape, with the KV bytes per token scaled by the parameter count.
    generation = generation_bytes(recipe, KV_BYTES_PER_TOKEN_8B * math.sqrt(max(params_b, 0.001) / 8))
    return _estimate(recipe, params_b, weights, trainable, activations + generation, source, generation=generation)


def per_gpu_gib(est: Estimate, mode: Mode, processes: int, gpus: int, gpu_memory_gib: float | None) -> float | None:
    """The most one GPU holds in `mode`, loading or training (load_gib, train_gib)."""
    load = load_gib(est, mode, processes, gpus)
    train = train_gib(est, mode, processes, gpus, gpu_memory_gib)
    return None if load is None or train is None else max(load, train)


def train_gib(est: Estimate, mode: Mode, processes: int, gpus: int, gpu_memory_gib: float | None) -> float | None:
    """What one GPU holds while training in `mode`, by its rule in the mode table: "whole", the whole
    model; "split", a slice of the weights and trainable state (`gpus` GPUs of one process);
    "sharded", a 1/`processes` share of what FSDP2 shards (every rank of every machine holds one),
    plus the gathered blocks."""
    if est.params_b is None:
        return None
    rule = SPECS[mode].memory
    fixed = est.activations_gib + CUDA_OVERHEAD_GIB  # every GPU runs its own batch (or, model, the pipeline's)
    if rule == "split" and gpus > 1:
        return round((est.weights_gib + est.trainable_gib) / gpus + fixed, 2)
    if rule == "sharded" and processes > 1:
        if gpu_memory_gib is not None and est.weights_gib <= FSDP_FIT_FRACTION * gpu_memory_gib:
            held = est.weights_gib + est.trainable_gib / processes
        else:
            block = est.weights_gib / (est.layers or DEFAULT_LAYERS)
            held = (est.weights_gib + est.trainable_gib) / processes + FSDP_GATHERED_BLOCKS * block
        return round(held + fixed, 2)
    return est.total_gib


def load_gib(est: Estimate, mode: Mode, processes: int, gpus: int) -> float | None:
    """What one GPU holds once the model is loaded, before training. Under fsdp a 16-bit model loads
    shard by shard (Unsloth's sharded loading): each rank reads its share of every linear weight and
    the embeddings and output head whole; a 4- or 8-bit model cannot be, so each rank loads all of it
    before FSDP2 shards it."""
    if est.params_b is None:
        return None
    rule = SPECS[mode].memory
    if rule == "split" and gpus > 1:
        held = est.weights_gib / gpus
    elif rule == "sharded" and processes > 1 and SPECS[mode].sharded_load and not est.quantized:
        held = est.embeddings_gib + (est.weights_gib - est.embeddings_gib) / processes
    else:
        held = est.weights_gib
    return round(held + CUDA_OVERHEAD_GIB, 2)


def merge_memory_gib(params: float) -> float:
    """CPU memory a merged export needs: the base in 16 bits, and what merging and saving hold beside it."""
    return round(params * 2 * MERGE_MEMORY_FACTOR / GIB, 1)


def fits(total_gib: float, memory_gib: float | None) -> bool:
    """Unknown GPU memory or an unknown model size are trusted to fit."""
    return memory_gib is None or total_gib <= memory_gib * USABLE_FRACTION
