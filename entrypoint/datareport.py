"""What the data is, before any GPU starts: for each source whose first rows the launcher read
(recipes/catalog.py checks up to 1000 of a local source), the format they matched, and how long they
are as the training program will see them, shaped by their format's entry in recipes/formats.py:
in tokens under the recipe's tokenizer where it is on this machine (entrypoint/host.py finds its
files; entrypoint/tokens.py renders and counts), else in characters. With the lengths: how many rows
model.max_seq_length would cut, and what share of a padded batch of training.per_device_batch_size
rows (in a seeded order, cut to max_seq_length) would be padding. Pure: the rows and the tokenizer's
files come in as data. A hub dataset's rows are read by the training program only; it says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from entrypoint.hub import TokenizerFiles
from recipes import formats
from recipes.catalog import Sample
from recipes.schema import Recipe


@dataclass(frozen=True)
class SourceReport:
    section: str  # data, or data.sources[N]
    source: str
    format: str
    rows_read: int | None  # None: a hub dataset, read by the training program
    max_seq_length: int = 0
    batch: int = 0  # training.per_device_batch_size
    unit: str | None = None  # tokens or characters
    measured_by: str = ""
    p50: int | None = None
    p95: int | None = None
    max: int | None = None
    longer_than_max_seq_length: int | None = None  # counted in tokens only
    padding_share: float | None = None  # None when rows are packed
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Characters:
    """Lengths in characters of the text a row holds, where no tokenizer is on this machine."""

    unit = "characters"
    template = None
    eos = ""

    def text(self, text: str) -> int:
        return len(text)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> int:
        return sum(len(_text_of(m["content"])) for m in messages)


def _text_of(content: Any) -> str:
    """A turn's text: its content, or (vision) its text parts; image parts hold no text."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content if isinstance(p, dict))


class Tokens:
    """Lengths in tokens: a chat through the chat template the training program renders it with
    (the tokenizer's own; with none, or with data.chat_template, the turns' text alone)."""

    unit = "tokens"

    def __init__(self, files: TokenizerFiles, use_template: bool) -> None:
        from entrypoint.tokens import LocalTokenizer  # tokenizers and jinja2: only when there is a tokenizer

        self.local = LocalTokenizer(files)
        self.template = self.local.template if use_template else None
        self.eos = self.local.special["eos_token"] or ""

    def text(self, text: str) -> int:
        return self.local.text(text)

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> int:
        if self.template is None:
            return sum(self.local.text(_text_of(m["content"])) for m in messages)
        flat = [{**m, "content": _text_of(m["content"])} for m in messages]
        return self.local.chat(flat, add_generation_prompt)


def length(shaped: dict[str, Any], counter: Characters | Tokens) -> int:
    """A shaped row's length as its trainer sees it: a chat whole (a prompt with its completion; a
    GRPO prompt with the generation prompt), a preference pair's longer side, text with its EOS."""
    if "completion" in shaped:
        return counter.chat(shaped["prompt"] + shaped["completion"])
    if "messages" in shaped:
        return counter.chat(shaped["messages"])
    if "chosen" in shaped:
        return max(counter.text(shaped["prompt"] + shaped[side]) for side in ("chosen", "rejected"))
    if "answer" in shaped:
        return counter.chat(shaped["prompt"], add_generation_prompt=True)
    return counter.text(shaped["text"] + counter.eos)


def percentile(ordered: list[int], share: float) -> int:
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def padding_share(lengths: list[int], batch: int, seed: int) -> float:
    """Of the positions of padded batches of `batch` rows in a seeded order, the share that is padding."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    padded = sum(max(chunk) * len(chunk) for chunk in (order[i : i + batch] for i in range(0, len(order), batch)))
    return round(1 - sum(order) / padded, 3) if padded else 0.0


def counter_for(recipe: Recipe, files: TokenizerFiles | None) -> tuple[Characters | Tokens, str, list[str]]:
    """(how to count, what counts, notes)."""
    if files is None:
        why = (
            "a random-init model's tokenizer is trained on the data when the run starts"
            if recipe.model.random_init is not None
            else f"no tokenizer of {recipe.model.name} here (local or cached)"
        )
        return Characters(), f"characters ({why})", []
    own = files.chat_template is not None
    try:
        counter = Tokens(files, use_template=own and recipe.data.chat_template is None)
    except Exception as exc:  # tokenizers' own error, from its Rust core: a file this version cannot read
        return Characters(), f"characters (the tokenizer.json of {files.folder} does not load here: {exc})", []
    notes = []
    if recipe.chats and counter.template is None:
        if recipe.data.chat_template:
            why = f"data.chat_template {recipe.data.chat_template} is applied in training"
        elif counter.local.template_error:
            why = f"the chat template does not compile here ({counter.local.template_error})"
        else:
            why = "the tokenizer has no chat template"
        notes.append(f"chats counted by their turns' text: {why}")
    return counter, f"tokens (tokenizer.json of {files.folder})", notes


def report(recipe: Recipe, samples: tuple[Sample, ...], files: TokenizerFiles | None) -> list[SourceReport]:
    counter, measured_by, notes = counter_for(recipe, files)
    reports = []
    for sample, source in zip(samples, recipe.data.datasets, strict=True):
        if not sample.local:
            reports.append(SourceReport(sample.section, sample.source, source.format, None))
            continue
        options = formats.Shaping(sample.source, recipe.data.system_prompt, recipe.data.train_on_responses_only)
        lengths, refused = [], []
        for row in sample.rows:
            shaped = formats.shape_row(row, source.format, options, source.layout)
            try:
                lengths.append(length(shaped, counter))
            except Exception as exc:  # the chat template's own refusal (raise_exception), or what it trips on
                refused.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                lengths.append(length(shaped, Characters()))
        reports.append(measured(recipe, sample, source.format, counter, measured_by, lengths, notes, refused))
    return reports


def measured(recipe, sample: Sample, fmt: str, counter, measured_by: str, lengths: list[int], notes, refused):
    ordered = sorted(lengths)
    tokens = counter.unit == "tokens"
    cap = recipe.model.max_seq_length
    extra = list(notes)
    if refused:
        extra.append(
            f"the chat template refuses {len(refused)} of {len(lengths)} rows (counted in characters): {refused[0]}"
        )
    return SourceReport(
        sample.section, sample.source, fmt, len(sample.rows), cap, recipe.training.per_device_batch_size,
        counter.unit, measured_by,
        percentile(ordered, 0.5), percentile(ordered, 0.95), ordered[-1],
        sum(1 for n in lengths if n > cap) if tokens else None,
        None if recipe.training.packing else padding_share(
            [min(n, cap) if tokens else n for n in lengths], recipe.training.per_device_batch_size, recipe.training.seed
        ),
        extra,
    )  # fmt: skip


def lines(reports: list[SourceReport]) -> list[str]:
    """The report for people: a line for each source, a line of its lengths."""
    out = []
    for r in reports:
        if r.rows_read is None:
            out.append(f"{r.section}.source {r.source}: format {r.format}; a hub dataset, whose rows the training "
                       f"program checks before the model loads")  # fmt: skip
            continue
        out.append(f"{r.section}.source {r.source}: format {r.format}, {r.rows_read} rows read")
        cut = (
            f"; {r.longer_than_max_seq_length} of {r.rows_read} longer than model.max_seq_length "
            f"{r.max_seq_length} (cut there)"
            if r.longer_than_max_seq_length is not None
            else ""
        )
        batches = (
            "; rows packed (training.packing): no padding"
            if r.padding_share is None
            else f"; padded batches of {r.batch}: {r.padding_share:.0%} padding"
        )
        out.append(f"  {r.measured_by}: p50 {r.p50}, p95 {r.p95}, max {r.max}{cut}{batches}")
        out += [f"  note: {note}" for note in r.notes]
    return out
