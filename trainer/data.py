"""Load a recipe's data and shape its rows into TRL's dataset forms, one shaper per data format
(which methods take which format: recipes/methods.py).

  text        -> {"text"}                         plain language modelling
  messages    -> {"messages"}                     the chat template renders whole chats
                 {"prompt", "completion"}         ... with train_on_responses_only: loss on the last reply
  instruction -> {"prompt", "completion"}         alpaca rows as a user turn and its answer
  preference  -> {"prompt", "chosen", "rejected"} pairs for preference optimisation
  prompt      -> {"prompt", "answer"}             a conversation to complete, scored by rewards (grpo)
  vision      -> {"messages", "images"}           chats whose contents are text and image parts, and the
                                                  images (decoded by datasets; rendered by the processor)
Every row is checked with formats.check_row, so a bad row is named before training starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipes import formats
from recipes.schema import DataConfig


def load_rows(
    source: str,
    split: str,
    max_samples: int | None = None,
    columns: dict[str, str] | None = None,
    subset: str | None = None,
    fmt: str | None = None,
):
    """-> a datasets.Dataset of the raw rows (a local file or folder, or a split of a hub dataset);
    a local vision dataset's rows as a list."""
    import datasets

    if Path(source).exists() and fmt == "vision":
        # Read here, not by datasets: a chat's contents may mix text and lists of parts, which
        # Arrow cannot hold in one column; the shaped rows are uniform (see _vision).
        every = (row for f in formats.data_files(Path(source)) for _, row in formats.rows(f))
        return [formats.renamed(row, columns or {}) for row in itertools.islice(every, max_samples)]
    if Path(source).exists():
        files = [str(p) for p in formats.data_files(Path(source))]
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[Path(files[0]).suffix.lower()]
        dataset = datasets.load_dataset(kind, data_files=files, split="train")
    else:
        dataset = datasets.load_dataset(source, subset, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if columns:
        dataset = dataset.rename_columns({k: v for k, v in columns.items() if k in dataset.column_names})
    return dataset


def _user_turn(row: dict[str, Any]) -> str:
    extra = row.get("input") or ""
    return f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]


def _text(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    return {"text": row["text"]}


def _preference(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def _instruction(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": _user_turn(row)}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


def _messages(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if not data.train_on_responses_only:
        return {"messages": messages}
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _prompt(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    """A conversation to complete (after data.system_prompt), and the answer rewards may check."""
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    answer = row.get("answer")
    return {
        "prompt": [*system, {"role": "user", "content": row["prompt"]}],
        "answer": "" if answer is None else str(answer),
    }


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's content as a list of parts of one shape (Arrow keeps one type per column)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": p["type"], "text": p.get("text") if p["type"] == "text" else None} for p in content]


def _vision(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    """A chat with images. Without image parts the images go before the first user turn's text;
    a local dataset's image paths become absolute (relative to data.source)."""
    messages = [{"role": m["role"], "content": _parts(m["content"])} for m in row["messages"]]
    images = list(formats.images_of(row))
    if not any(part["type"] == "image" for m in messages for part in m["content"]):
        first = next((m for m in messages if m["role"] == "user"), messages[0])
        first["content"][:0] = [{"type": "image", "text": None} for _ in images]
    source = Path(data.source)
    if source.exists():
        root = formats.image_root(source)
        images = [str(root / image) if isinstance(image, str) else image for image in images]
    return {"messages": messages, "images": images}


SHAPERS: dict[str, Callable[[dict[str, Any], DataConfig], dict[str, Any]]] = {
    "text": _text,
    "preference": _preference,
    "instruction": _instruction,
    "messages": _messages,
    "prompt": _prompt,
    "vision": _vision,
}


def shape_row(row: dict[str, Any], data: DataConfig) -> dict[str, Any]:
    return SHAPERS[data.format](row, data)


def _checked_and_shaped(raw, data: DataConfig, field: str, where: str):
    local = Path(where).exists()
    if data.format == "vision" and not local:
        raw = undecoded(raw)
    for number, row in enumerate(raw, start=1):
        formats.check_row(row, data.format, f"{field} {where} row {number}")
        if data.format == "vision" and local:
            formats.check_images(row, formats.image_root(Path(where)), f"{field} {where} row {number}")
    if data.format != "vision":
        return raw.map(lambda row: shape_row(row, data), remove_columns=raw.column_names)
    import datasets

    if local:
        data = data.model_copy(update={"source": where})  # image paths are relative to this file or folder
        shaped = datasets.Dataset.from_list([shape_row(row, data) for row in raw])
    else:
        shaped = raw.map(lambda row: shape_row(row, data), remove_columns=raw.column_names)
    # Paths (local data) or images (a hub dataset's) alike: decoded to PIL images when read.
    return shaped.cast_column("images", datasets.Sequence(datasets.Image()))


def undecoded(raw):
    """A hub vision dataset whose images stay encoded ({"bytes", "path"}) while rows are checked and
    shaped: decoding every image there (and encoding it again after map) would cost minutes."""
    import datasets

    features = getattr(raw, "features", {})
    inner = getattr(features.get("images"), "feature", None)
    if isinstance(inner, datasets.Image):
        return raw.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    if isinstance(features.get("image"), datasets.Image):
        return raw.cast_column("image", datasets.Image(decode=False))
    return raw


def build(data: DataConfig, seed: int):
    """-> (training rows, evaluation rows or None), every row checked and shaped for the trainer
    (see the table above). The evaluation rows are data.eval_split, or a seeded data.eval_fraction
    of the training rows, which are then left out of training."""
    raw = load_rows(data.source, data.split, data.max_samples, data.columns, data.subset, data.format)
    train = _checked_and_shaped(raw, data, "data.source", data.source)
    if data.eval_fraction is not None:
        halves = train.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        return halves["train"], halves["test"]
    if data.eval_split is not None:
        local = Path(data.eval_split).exists()
        held_out = load_rows(
            data.eval_split if local else data.source,
            data.eval_split,
            columns=data.columns,
            subset=data.subset,
            fmt=data.format,
        )
        return train, _checked_and_shaped(held_out, data, "data.eval_split", data.eval_split)
    return train, None


def texts_of(dataset) -> list[str]:
    """Every string in the shaped rows: the corpus a random-init model's tokenizer learns."""
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)

    for row in dataset:
        collect(row)
    return texts
