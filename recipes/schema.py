"""The one schema every recipe YAML is validated against.

Imports pydantic only (never torch or unsloth), so the launcher can validate and plan a
recipe instantly on a laptop or in CI. Every message that reaches a user names the field,
the value and the fix; `errors.format_validation_error` turns pydantic's errors into that.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recipes.errors import BadInput
from recipes.exports import GGUF_QUANTS, KINDS
from recipes.formats import FORMATS, NO_GGUF_WITH_IMAGES, ROLES, Format, Layout
from recipes.methods import METHODS, DpoOptions, GrpoOptions

# Unsloth's usual LoRA targets for dense decoders (Llama, Qwen, Gemma, Mistral).
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RandomInit(Strict):
    """Build the model with random weights from this shape instead of downloading one.

    Used by the offline smoke recipe and by the benchmarks. The tokenizer is a byte-level
    BPE trained on the recipe's own data, so nothing is fetched from a hub.
    """

    architecture: Literal["llama", "gemma3-vision"] = Field(
        default="llama",
        description="llama: a text decoder; gemma3-vision: Gemma 3's image-text model (a tiny vision tower)",
    )
    hidden_size: PositiveInt = 64
    intermediate_size: PositiveInt = 128
    num_hidden_layers: PositiveInt = 2
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt | None = None
    vocab_size: Annotated[int, Field(ge=260)] = 512
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> RandomInit:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.kv_heads}; pick a KV head count that divides it"
            )
        return self

    @property
    def kv_heads(self) -> int:
        """Key/value heads: as many as attention heads unless grouped-query attention says fewer."""
        return self.num_key_value_heads or self.num_attention_heads


class ModelConfig(Strict):
    name: str = Field(min_length=1, description="Hugging Face hub id or local folder")
    random_init: RandomInit | None = None
    size_b: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="parameters in billions, for the planner when the name does not say",
    )
    max_seq_length: PositiveInt = 2048
    load_in: Literal["4bit", "8bit", "16bit"] = "4bit"
    full_finetuning: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _full_finetuning_is_16bit(self) -> ModelConfig:
        if self.full_finetuning and self.load_in != "16bit":
            raise ValueError(
                f"full_finetuning trains every weight and needs load_in: 16bit, "
                f"not {self.load_in!r}; set model.load_in=16bit or use LoRA"
            )
        return self


class LoraConfig(Strict):
    r: PositiveInt = 16
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    use_rslora: bool = False
    # Which parts of a vision-language model train (data.format vision), as Unsloth's FastVisionModel
    # names them; target_modules narrows them to those module names when the recipe gives it.
    finetune_vision_layers: bool = Field(default=True, description="vision: LoRA on the vision tower")
    finetune_language_layers: bool = Field(default=True, description="vision: LoRA on the language model")
    finetune_attention_modules: bool = Field(default=True, description="vision: LoRA on attention")
    finetune_mlp_modules: bool = Field(default=True, description="vision: LoRA on the MLPs")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("target_modules is empty; name at least one module, e.g. [q_proj, v_proj]")
        return value


DataFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]  (the one table, in recipes/formats.py)
Role = Literal[ROLES]  # type: ignore[valid-type]
Name = Annotated[str, Field(min_length=1)]


class ChatMapping(Strict):
    """data.chat: where chat rows keep their turns, when not where the format says (messages: messages,
    role, content; sharegpt: conversations, from, value). Role names are added to the format's own."""

    turns: Name | None = Field(default=None, description="the key that holds the list of turns")
    role: Name | None = Field(default=None, description="the key of a turn's role name")
    content: Name | None = Field(default=None, description="the key of a turn's text")
    roles: dict[str, Role] = Field(
        default_factory=dict, description="what each role name means: system, user, assistant or tool"
    )


class DataSource(Strict):
    """One dataset: where its rows are, what they hold, and (one of several) its share of the mix."""

    source: str = Field(
        min_length=1,
        description="local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset id",
    )
    subset: str | None = Field(default=None, description="the hub dataset's configuration, e.g. main for openai/gsm8k")
    split: str = "train"
    format: DataFormat = "messages"
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename the source's columns to the format's fields, e.g. {question: prompt}"
    )
    chat: ChatMapping | None = Field(default=None, description="chats in a layout of their own (see ChatMapping)")
    max_samples: PositiveInt | None = Field(default=None, description="read at most this many rows, the first ones")
    eval_split: str | None = Field(
        default=None,
        description="evaluate on this split of the hub dataset, or on this local file or folder (same format)",
    )
    rows: PositiveInt | None = Field(default=None, description="data.sources: take this many rows (a seeded sample)")
    fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="data.sources: this share of the mix (every source gives one; they add up to 1)"
    )

    @model_validator(mode="after")
    def _mapping_for_chats(self) -> DataSource:
        mapping_problem(self.format, self.chat, "")
        if self.rows is not None and self.fraction is not None:
            raise ValueError(
                f"rows ({self.rows}) and fraction ({self.fraction}) both choose this source's share; keep one"
            )
        return self

    @property
    def layout(self) -> Layout | None:
        """Where its chats keep their turns: the format's layout, with data.chat applied."""
        base, chat = FORMATS[self.format].layout, self.chat
        if base is None or chat is None:
            return base
        return base.mapped(chat.turns, chat.role, chat.content, chat.roles)


def mapping_problem(fmt: str, chat: ChatMapping | None, prefix: str) -> None:
    """A chat mapping is for formats whose rows are lists of turns."""
    if chat is not None and FORMATS[fmt].layout is None:
        takers = [name for name, f in FORMATS.items() if f.layout is not None]
        raise ValueError(
            f"{prefix}chat maps the turns of chat rows (format {' or '.join(takers)}), and the format is {fmt}; "
            f"remove {prefix}chat, or set {prefix}format to {takers[0]}"
        )


# The keys of one source that the single-source form holds in data itself.
SOURCE_KEYS = ("source", "subset", "split", "format", "columns", "chat", "max_samples", "eval_split")


class DataConfig(Strict):
    source: str | None = Field(
        default=None,
        min_length=1,
        description="local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset id (or: sources)",
    )
    sources: list[DataSource] | None = Field(
        default=None, min_length=1, description="several datasets mixed into one (each with its share)"
    )
    subset: str | None = Field(default=None, description="the hub dataset's configuration, e.g. main for openai/gsm8k")
    split: str = "train"
    format: DataFormat = "messages"
    chat: ChatMapping | None = Field(default=None, description="chats in a layout of their own (see ChatMapping)")
    chat_template: str | None = Field(
        default=None, description="an Unsloth chat template name; default: the tokenizer's own"
    )
    train_on_responses_only: bool = False
    max_samples: PositiveInt | None = None
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename the source's columns to the format's fields, e.g. {question: prompt}"
    )
    system_prompt: str | None = Field(
        default=None, description="format prompt: a system message before every prompt (e.g. the answer format)"
    )
    eval_fraction: Annotated[float, Field(gt=0, le=0.5)] | None = Field(
        default=None, description="hold out this share of the rows (seeded) to evaluate on"
    )
    eval_split: str | None = Field(
        default=None,
        description="evaluate on this split of the hub dataset, or on this local file or folder (same format)",
    )

    @model_validator(mode="after")
    def _one_form(self) -> DataConfig:
        if (self.source is None) == (self.sources is None):
            raise ValueError(
                "data needs source (one dataset) or sources (a list of several, each with its source), "
                + ("not both" if self.source is not None else "and has neither")
            )
        if self.sources is not None:
            defaults = DataSource(source="x")
            given = [k for k in SOURCE_KEYS if k != "source" and getattr(self, k) != getattr(defaults, k)]
            if given:
                raise ValueError(
                    f"data.{given[0]} is a key of one source; with data.sources give it to each source that "
                    f"needs it (data.sources[N].{given[0]})"
                )
            self._shares_add_up(self.sources)
        else:
            mapping_problem(self.format, self.chat, "data.")
        evaluated = [s for s in self.datasets if s.eval_split is not None]
        if self.eval_fraction is not None and evaluated:
            raise ValueError(
                f"data.eval_fraction ({self.eval_fraction}) and an eval_split ({evaluated[0].eval_split!r}) both "
                f"choose the evaluation rows; keep one of them"
            )
        return self

    @staticmethod
    def _shares_add_up(sources: list[DataSource]) -> None:
        fractions = [s.fraction for s in sources if s.fraction is not None]
        if not fractions:
            return
        if len(fractions) < len(sources):
            other = next(i for i, s in enumerate(sources) if s.fraction is None)
            raise ValueError(
                f"data.sources[{other}] has no fraction while others do: fractions are shares of the mix, so give "
                f"every source one (adding up to 1), or give none and choose rows per source"
            )
        if abs(sum(fractions) - 1) > 1e-6:
            listed = " + ".join(f"{f:g}" for f in fractions)
            raise ValueError(
                f"the fractions of data.sources add up to {sum(fractions):g} ({listed}), not 1; "
                f"make them shares of the mix that add up to 1"
            )

    @property
    def datasets(self) -> list[DataSource]:
        """Every source as one DataSource: data.sources, or the single-source form's keys."""
        if self.sources is not None:
            return list(self.sources)
        return [DataSource(**{k: getattr(self, k) for k in SOURCE_KEYS})]

    def shares(self, sizes: list[int]) -> list[int]:
        """How many rows each source gives the mix, from how many it has: its rows (refused when it has
        fewer), or its fraction of the largest mix the sources fill without repeating a row, or all."""
        sources = self.datasets
        if all(s.fraction is not None for s in sources):
            fractions = [float(s.fraction or 0) for s in sources]
            total = min(size / fraction for size, fraction in zip(sizes, fractions, strict=True))
            return [min(size, round(total * f)) for size, f in zip(sizes, fractions, strict=True)]
        for index, (source, size) in enumerate(zip(sources, sizes, strict=True)):
            if source.rows is not None and source.rows > size:
                raise BadInput(
                    f"{self.section(index)}.rows is {source.rows}, but {source.source} holds {size} rows; "
                    f"take at most {size}, or drop rows to take every row"
                )
        return [size if s.rows is None else s.rows for s, size in zip(sources, sizes, strict=True)]

    def section(self, index: int) -> str:
        """Where source `index` sits in the recipe, for messages: data, or data.sources[N]."""
        return "data" if self.sources is None else f"data.sources[{index}]"

    @property
    def evaluates(self) -> bool:
        return self.eval_fraction is not None or any(s.eval_split is not None for s in self.datasets)


VISION_PARTS = (
    "finetune_vision_layers",
    "finetune_language_layers",
    "finetune_attention_modules",
    "finetune_mlp_modules",
)
VISION_ARCHITECTURES = ("gemma3-vision",)  # random_init shapes that take images
# The vision tower of a random-init gemma3-vision model (its config.json's vision_config): tiny and
# fixed, since tests and smoke runs need only that images flow through it; 56x56 pixels in patches
# of 14, pooled to 4 image tokens.
TINY_VISION_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "vision_use_head": False,  # as in Gemma 3: its pooling head is never used, so it has none
}
TINY_IMAGE_TOKENS = 4


class TrainingConfig(Strict):
    method: Literal[tuple(METHODS)] = "sft"  # type: ignore[valid-type]  (recipes/methods.py)
    epochs: Annotated[float, Field(gt=0)] = 1.0
    max_steps: int = Field(default=-1, ge=-1, description="-1: run for `epochs`")
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: NonNegativeInt = 5
    per_device_batch_size: PositiveInt = 2
    gradient_accumulation_steps: PositiveInt = 4
    packing: bool = False
    seed: int = 3407
    gradient_checkpointing: bool | Literal["unsloth"] = "unsloth"
    optimizer: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"] = "adamw_8bit"
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    eval_steps: NonNegativeInt = Field(
        default=0, description="evaluate every N steps (0: at the start and the end only); needs data.eval_*"
    )
    collective_timeout_s: PositiveInt = Field(
        default=1800, description="a rank waiting longer than this in a collective fails the job"
    )
    # Each method's own options (recipes/methods.py), present for that method only, with its defaults.
    dpo: DpoOptions | None = None
    grpo: GrpoOptions | None = None

    @field_validator("max_steps")
    @classmethod
    def _no_zero_steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_steps 0 trains nothing; use a positive count, or -1 for epochs")
        return value

    @property
    def sections(self) -> dict[str, DpoOptions | GrpoOptions | None]:
        """Each method's options section by the method's name (test_methods holds it to METHODS)."""
        return {"dpo": self.dpo, "grpo": self.grpo}

    @model_validator(mode="after")
    def _options_of_the_method_only(self) -> TrainingConfig:
        """Each method's options section exists for that method only, with its defaults."""
        for name, given in self.sections.items():
            options = METHODS[name].options
            assert options is not None
            if given is not None and name != self.method:
                raise ValueError(
                    f"training.{name} holds options of training.method {name}, but the method is "
                    f"{self.method}; remove training.{name} or set training.method={name}"
                )
            if given is None and name == self.method:
                required = [k for k, f in options.model_fields.items() if f.is_required()]
                if required:
                    raise ValueError(
                        f"training.method {name} needs its section training.{name} with {', '.join(required)}; "
                        f"e.g. the override training.{name}.{required[0]}=... (see recipes/methods.py)"
                    )
                object.__setattr__(self, name, options())  # validated defaults; no re-validation loop
        return self


class OutputConfig(Strict):
    dir: str | None = Field(default=None, description="default: $OUTPUTS_DIR/<recipe name> (OUTPUTS_DIR: ./outputs)")
    save: list[Literal[KINDS]] = Field(default_factory=lambda: ["adapter"])  # type: ignore[valid-type]
    gguf_quantization: Literal[GGUF_QUANTS] = "q8_0"  # type: ignore[valid-type]  (recipes/exports.py)
    save_steps: NonNegativeInt = Field(default=0, description="0: no intermediate checkpoints")
    keep_checkpoints: PositiveInt = 2
    resume: bool = True
    check: bool = Field(
        default=True, description="check merged / GGUF exports against the trained model (exports.json's check)"
    )

    @property
    def gguf_quants(self) -> tuple[str, ...]:
        """The GGUF types `save` asks for (none without gguf)."""
        return (self.gguf_quantization,) if "gguf" in self.save else ()


class LoggingConfig(Strict):
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    steps: PositiveInt = 10


SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class Recipe(Strict):
    # The name becomes a folder under OUTPUTS_DIR: no separators, no "..", nothing a shell reads.
    name: str | None = Field(default=None, pattern=SAFE_NAME, description="default: the file name without .yaml")
    description: str = ""
    allow_cpu: bool = Field(default=False, description="may train without a GPU (only tiny models make sense)")
    model: ModelConfig
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.model.full_finetuning and self.lora is not None:
            raise ValueError(
                "model.full_finetuning trains every weight, so lora must be null; "
                "set lora=null or model.full_finetuning=false"
            )
        if not self.model.full_finetuning and self.lora is None:
            raise ValueError(
                "lora is null but model.full_finetuning is false: nothing would train; "
                "give a lora section or set model.full_finetuning=true"
            )
        if self.model.full_finetuning and set(self.output.save) - {"adapter"}:
            raise ValueError(
                "output.save merged_16bit / gguf export a LoRA run; full fine-tuning already saves "
                "the whole model in model/, so set output.save=[adapter]"
            )
        self._vision_consistent()
        self._data_consistent()
        grpo = self.training.grpo
        if grpo is not None:
            per_step = self.training.per_device_batch_size * self.training.gradient_accumulation_steps
            if per_step % grpo.num_generations:
                raise ValueError(
                    f"training.per_device_batch_size x gradient_accumulation_steps = {per_step} completions per step "
                    f"on each process, which must be whole groups of training.grpo.num_generations = "
                    f"{grpo.num_generations}; make one a multiple of the other"
                )
            if self.data.evaluates and self.training.per_device_batch_size % grpo.num_generations:
                raise ValueError(
                    f"evaluating GRPO generates whole groups on each process: training.per_device_batch_size "
                    f"({self.training.per_device_batch_size}) must be a multiple of training.grpo.num_generations "
                    f"({grpo.num_generations}), or drop data.eval_fraction / data.eval_split"
                )
            if grpo.max_completion_length >= self.model.max_seq_length:
                raise ValueError(
                    f"training.grpo.max_completion_length ({grpo.max_completion_length}) leaves no room for the prompt "
                    f"in model.max_seq_length ({self.model.max_seq_length}); raise the one or lower the other"
                )
        if self.training.eval_steps and not self.data.evaluates:
            raise ValueError(
                f"training.eval_steps={self.training.eval_steps} but there is nothing to evaluate on; set "
                f"data.eval_fraction (e.g. 0.1) or data.eval_split, or training.eval_steps=0"
            )
        return self

    def _data_consistent(self) -> None:
        """Each source's format is one the method trains on, and the sources shape to one kind of row."""
        data, method = self.data, METHODS[self.training.method]
        shaped: dict[tuple[str, ...], str] = {}
        for index, source in enumerate(data.datasets):
            fmt, key = source.format, f"{data.section(index)}.format"
            if fmt not in method.formats:
                takers = [m.name for m in METHODS.values() if fmt in m.formats]
                raise ValueError(
                    f"training.method {method.name} needs {key} {' or '.join(method.formats)}, not {fmt}"
                    + (f"; data.format {fmt} is for training.method {' or '.join(takers)}" if takers else "")
                )
            if data.train_on_responses_only and not FORMATS[fmt].responses_only:
                takers = " or ".join(name for name, f in FORMATS.items() if f.responses_only)
                raise ValueError(f"data.train_on_responses_only needs conversations (format {takers}), not {fmt}")
            shaped.setdefault(FORMATS[fmt].shaped_fields(data.train_on_responses_only), f"{key} {fmt}")
        if len(shaped) > 1:
            (fields, one), (other_fields, other) = list(shaped.items())[:2]
            responses = {f.shaped_fields(True) for f in self.formats} == {("prompt", "completion")}
            raise ValueError(
                f"{one} shapes to rows of {'/'.join(fields)} and {other} to rows of {'/'.join(other_fields)}, which "
                f"one trainer cannot take together; "
                + (
                    "set data.train_on_responses_only=true (both then shape to prompt/completion)"
                    if responses
                    else "mix sources of formats that shape alike, or train on them in turn"
                )
            )

    @property
    def formats(self) -> tuple[Format, ...]:
        """The format table's entries of the recipe's sources, each once, in their order."""
        return tuple(FORMATS[name] for name in dict.fromkeys(s.format for s in self.data.datasets))

    @property
    def chats(self) -> bool:
        """Rows rendered with a chat template (any source's)."""
        return any(f.chat for f in self.formats)

    @property
    def vision(self) -> bool:
        """It trains an image-text model on chats about images (loaded with its processor)."""
        return any(f.images for f in self.formats)

    def refused_in(self, mode: str) -> tuple[str, str] | None:
        """(what refuses it, why) when its data format or its method cannot train in `mode`."""
        method = METHODS[self.training.method]
        for what, refused, why in (
            *((f"data.format {fmt.name}", fmt.refused_modes, fmt.why_refused) for fmt in self.formats),
            (f"training.method {method.name}", method.refused_modes, method.why_refused),
        ):
            if mode in refused:
                return what, why
        return None

    def _vision_consistent(self) -> None:
        """Images need a vision-language model; the vision parts of lora mean nothing without images."""
        vision, fmt = self.vision, self.formats[0].name
        spec = self.model.random_init
        if spec is not None and vision != (spec.architecture in VISION_ARCHITECTURES):
            raise ValueError(
                f"data.format {fmt} with model.random_init.architecture {spec.architecture}: "
                + (
                    f"images need a vision-language model; set model.random_init.architecture={VISION_ARCHITECTURES[0]}"
                    if vision
                    else "a vision-language model trains on images here; set data.format=vision"
                )
            )
        if vision and self.data.train_on_responses_only:
            raise ValueError(
                "data.train_on_responses_only is not built for data.format vision (every answer of the chat "
                "is learned); set data.train_on_responses_only=false"
            )
        if vision and self.training.packing:
            raise ValueError(
                "training.packing joins rows into one sequence, which TRL cannot do with images; "
                "set training.packing=false for data.format vision"
            )
        if vision and "gguf" in self.output.save:
            raise ValueError(f"output.save gguf: {NO_GGUF_WITH_IMAGES}")
        if vision and self.data.chat_template is not None:
            raise ValueError(
                f"data.chat_template {self.data.chat_template!r}: a vision model renders chats with its "
                f"processor's own template; remove data.chat_template"
            )
        lora = self.lora
        if lora is None:
            return
        changed = [part for part in VISION_PARTS if not getattr(lora, part)]  # all true by default
        if changed and not vision:
            raise ValueError(
                f"lora.{changed[0]}=false chooses the parts of a vision-language model, and data.format is "
                f"{fmt}; remove it, or train on images with data.format=vision"
            )
        if vision and not (lora.finetune_vision_layers or lora.finetune_language_layers):
            raise ValueError(
                "lora.finetune_vision_layers and lora.finetune_language_layers are both false: nothing would "
                "train; set one of them to true"
            )
        if vision and not (lora.finetune_attention_modules or lora.finetune_mlp_modules):
            raise ValueError(
                "lora.finetune_attention_modules and lora.finetune_mlp_modules are both false: nothing would "
                "train; set one of them to true"
            )
