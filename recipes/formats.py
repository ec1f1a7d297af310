"""The data formats a recipe can name (`data.format`): one table, read by the schema, the launcher
and the training program. An entry says what a row must hold (and an example of one), how the
trainer shapes it for TRL, whether a chat template renders it, whether it carries images, and the
modes it cannot train in. Which methods train on which format: recipes/methods.py.

  text        {"text"}                           -> {"text"}                  plain language modelling
  instruction {"instruction", "input", "output"} -> {"prompt", "completion"}  a user turn and its answer
  messages    {"messages": [{role, content}]}    -> {"messages"}              whole chats
                                                    {"prompt", "completion"}  ... train_on_responses_only
  preference  {"prompt", "chosen", "rejected"}   -> the same                  preference pairs (dpo)
  prompt      {"prompt", "answer"?}              -> {"prompt", "answer"}      a chat to complete (grpo)
  vision      {"messages" with image parts, "images"} -> {"messages", "images"} chats about images

A new format is one entry in FORMATS (and its tests). Below the table: a local data source's files
and rows. The launcher checks a local file's first rows when it validates a recipe; the training
program checks every row as it builds the dataset; both with check_row, so a bad row gets the same
message (file, row number, field) wherever it is found. No torch here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from recipes.errors import BadInput

ROLES = ("system", "user", "assistant", "tool")

Row = dict[str, Any]


class ShapeOptions(Protocol):
    """What shaping reads of the recipe's data section (recipes/schema.py's DataConfig)."""

    source: str
    system_prompt: str | None
    train_on_responses_only: bool


@dataclass(frozen=True)
class Format:
    name: str
    example: str  # one row, for messages
    problem: Callable[[Row], str | None]  # what is wrong with a row (naming the field), or None
    shape: Callable[[Row, ShapeOptions], Row]  # the row as the method's TRL trainer takes it
    chat: bool = False  # rendered with a chat template (the tokenizer's, or data.chat_template)
    images: bool = False  # chats about images: an image-text model, loaded with its processor
    responses_only: bool = False  # data.train_on_responses_only can leave the loss to the replies
    refused_modes: tuple[str, ...] = ()  # modes it cannot train in, refused before launch
    why_refused: str = ""


# ---- what a row must hold


def _text_fields(*fields: str) -> Callable[[Row], str | None]:
    def problem(row: Row) -> str | None:
        for field in fields:
            if field not in row:
                return f"has no field {field!r}"
            if not isinstance(row[field], str):
                return f"field {field!r} is {type(row[field]).__name__}, not text"
        return None

    return problem


def _instruction_problem(row: Row) -> str | None:
    problem = _text_fields("instruction", "output")(row)
    if problem is None and not isinstance(row.get("input", ""), str | None):
        return "field 'input' is not text"
    return problem


def _prompt_problem(row: Row) -> str | None:
    problem = _text_fields("prompt")(row)
    if problem is None and not isinstance(row.get("answer", ""), str | int | float | None):
        return "field 'answer' is not text or a number"
    return problem


def _content_problem(content: Any, parts_allowed: bool) -> str | None:
    """A message's content: text, or (vision) a list of text and image parts."""
    if isinstance(content, str):
        return None
    if not parts_allowed or not isinstance(content, list):
        return "has no text field 'content'" + (" (nor a list of parts)" if parts_allowed else "")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if (kind == "text" and isinstance(part.get("text"), str)) or kind == "image":
            continue
        return f'content[{j}] is not a text part {{"type": "text", "text": "..."}} or an image part {{"type": "image"}}'
    return None


def _chat_problem(row: Row, parts_allowed: bool = False) -> str | None:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field 'messages' is missing or not a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] is not an object"
        problem = _content_problem(message.get("content"), parts_allowed)
        if problem:
            return f"messages[{i}] {problem}"
        if message.get("role") not in ROLES:
            return f"messages[{i}].role is {message.get('role')!r}, not one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" for m in messages):
        return "field 'messages' has no assistant turn to learn from"
    return None


def images_of(row: Row) -> Any:
    """A vision row's images: its list `images`, or its one `image` (as many hub datasets hold it)."""
    if "images" not in row and "image" in row:
        return [row["image"]]
    return row.get("images")


def _is_image(image: Any) -> bool:
    """A path; a datasets Image value, decoded (a PIL image) or not ({"bytes", "path"})."""
    if isinstance(image, str):
        return bool(image)
    if isinstance(image, dict):
        return bool(image.get("bytes") or image.get("path"))
    return hasattr(image, "getdata") and hasattr(image, "mode")  # PIL, not imported here


def _vision_problem(row: Row) -> str | None:
    problem = _chat_problem(row, parts_allowed=True)
    if problem is not None:
        return problem
    images = images_of(row)
    if not isinstance(images, list) or not images:
        return "field 'images' is missing or not a non-empty list of images"
    for i, image in enumerate(images):
        if not _is_image(image):
            return f"images[{i}] is {type(image).__name__}, not an image path (or an image of a hub dataset)"
    parts = (p for m in row["messages"] if isinstance(m["content"], list) for p in m["content"])
    slots = sum(1 for p in parts if p["type"] == "image")
    if slots and slots != len(images):
        return f"has {slots} image parts in its messages but {len(images)} images; give one image per part"
    return None


# ---- shaped for the trainer


def _text(row: Row, data: ShapeOptions) -> Row:
    return {"text": row["text"]}


def _preference(row: Row, data: ShapeOptions) -> Row:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def _instruction(row: Row, data: ShapeOptions) -> Row:
    extra = row.get("input") or ""
    user = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


def _messages(row: Row, data: ShapeOptions) -> Row:
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if not data.train_on_responses_only:
        return {"messages": messages}
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _prompt(row: Row, data: ShapeOptions) -> Row:
    """A conversation to complete (after data.system_prompt), and the answer rewards may check."""
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    answer = row.get("answer")
    return {
        "prompt": [*system, {"role": "user", "content": row["prompt"]}],
        "answer": "" if answer is None else str(answer),
    }


def _parts(content: str | list[Row]) -> list[Row]:
    """A message's content as a list of parts of one shape (Arrow keeps one type per column)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": p["type"], "text": p.get("text") if p["type"] == "text" else None} for p in content]


def image_root(source: Path) -> Path:
    """Where a local vision dataset's relative image paths start: its folder, or the file's folder."""
    return source if source.is_dir() else source.parent


def _vision(row: Row, data: ShapeOptions) -> Row:
    """A chat with images. Without image parts the images go before the first user turn's text;
    a local dataset's image paths become absolute (relative to data.source)."""
    messages = [{"role": m["role"], "content": _parts(m["content"])} for m in row["messages"]]
    images = list(images_of(row))
    if not any(part["type"] == "image" for m in messages for part in m["content"]):
        first = next((m for m in messages if m["role"] == "user"), messages[0])
        first["content"][:0] = [{"type": "image", "text": None} for _ in images]
    source = Path(data.source)
    if source.exists():
        root = image_root(source)
        images = [str(root / image) if isinstance(image, str) else image for image in images]
    return {"messages": messages, "images": images}


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "messages",
            '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
            _chat_problem,
            _messages,
            chat=True,
            responses_only=True,
        ),
        Format(
            "instruction",
            '{"instruction": "...", "input": "", "output": "..."}',
            _instruction_problem,
            _instruction,
            chat=True,
            responses_only=True,
        ),
        Format("text", '{"text": "..."}', _text_fields("text"), _text),
        Format(
            "preference",
            '{"prompt": "...", "chosen": "...", "rejected": "..."}',
            _text_fields("prompt", "chosen", "rejected"),
            _preference,
        ),
        Format(
            "prompt",
            '{"prompt": "...", "answer": "..."} (answer optional: for rewards that check it)',
            _prompt_problem,
            _prompt,
            chat=True,
        ),
        Format(
            "vision",
            '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, '
            '{"role": "assistant", "content": "..."}], "images": ["images/1.png"]} (paths relative to data.source; '
            'or one "image")',
            _vision_problem,
            _vision,
            images=True,
            refused_modes=("fsdp",),
            why_refused="Unsloth's FSDP2 shards text decoders, and a vision model's tower is not among them",
        ),
    )
}

# What an image-text model cannot be exported to yet, said by the recipe check and by `export`.
NO_GGUF_WITH_IMAGES = (
    "the GGUF export of a vision model (the model and its mmproj file) is not built yet; "
    "export merged_16bit, which llama.cpp's converter takes"
)


def row_problem(row: Any, fmt: str) -> str | None:
    """None when the row fits the format, else what is wrong with it (naming the field)."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    return FORMATS[fmt].problem(row)


def check_row(row: Any, fmt: str, where: str) -> None:
    problem = row_problem(row, fmt)
    if problem is not None:
        raise BadInput(
            f"{where} {problem}, so it does not match data.format {fmt}; "
            f"each row must look like {FORMATS[fmt].example} (or set data.format to what the file holds)"
        )


def shape_row(row: Row, fmt: str, data: ShapeOptions) -> Row:
    return FORMATS[fmt].shape(row, data)


def refuse_quantized_images_on_cpu(fmt: str, load_in: str, gpu: bool) -> None:
    """On the CPU an image-text model loads through transformers, in 16 bits (trainer/models.py)."""
    if FORMATS[fmt].images and not gpu and load_in != "16bit":
        raise BadInput(
            f"model.load_in {load_in}: a vision model on the CPU loads in 16 bits; "
            f"set model.load_in=16bit, or train on a GPU"
        )


# ---- local data: the files of a data.source, and their rows


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROWS_CHECKED_BY_LAUNCHER = 1000


def looks_local(source: str) -> bool:
    """A data source written as a path (rather than a hub id like org/name)."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith(DATA_SUFFIXES) or Path(source).exists()


def rows(path: Path, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """(1-based row number, row) for the first `limit` rows of a local file (None: every row)."""
    over = (lambda number: False) if limit is None else (lambda number: number > limit)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            number = 0
            for line in handle:
                if not line.strip():
                    continue
                number += 1
                if over(number):
                    return
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInput(f"{path} row {number} is not valid JSON ({exc.msg}); fix that line") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path} is not valid JSON at line {exc.lineno}: {exc.msg}; fix the file") from None
        if not isinstance(data, list):
            raise BadInput(f"{path} must hold a JSON list of rows, not {type(data).__name__}; or use .jsonl")
        yield from enumerate(data if limit is None else data[:limit], start=1)
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=1):
                if over(number):
                    return
                yield number, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets; only parquet needs it

        table = pq.read_table(path)
        table = table if limit is None else table.slice(0, limit)
        yield from enumerate(table.to_pylist(), start=1)


def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise BadInput(f"data folder {str(path)!r} holds no {'/'.join(DATA_SUFFIXES)} file; put the data there")
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise BadInput(f"data file {str(path)!r} is not one of {', '.join(DATA_SUFFIXES)}; convert it or rename it")
    return [path]


def renamed(row: Any, columns: dict[str, str]) -> Any:
    """The row with its columns renamed as data.columns says (source name -> format field)."""
    if not columns or not isinstance(row, dict):
        return row
    return {columns.get(key, key): value for key, value in row.items()}


def image_problem(row: dict[str, Any], root: Path) -> str | None:
    """A local vision row's image paths (relative to `root`) must name files; None when they do."""
    for i, image in enumerate(images_of(row)):
        if isinstance(image, str) and not (root / image).is_file():
            return f"images[{i}] {image!r} is not a file (under {root})"
    return None


def check_images(row: dict[str, Any], root: Path, where: str) -> None:
    problem = image_problem(row, root)
    if problem is not None:
        raise BadInput(f"{where} {problem}; put the image there or fix the path (relative to data.source)")


def check_local_row(row: Any, fmt: str, source: Path, where: str) -> None:
    """One row of a local file: its fields, and (images) that its image files are there."""
    check_row(row, fmt, where)
    if FORMATS[fmt].images:
        check_images(row, image_root(source), where)


def check_local_file(path: Path, fmt: str, field: str = "data.source", columns: dict[str, str] | None = None) -> int:
    """Check the first rows of a local file or folder; return how many rows were checked."""
    checked = 0
    for file in data_files(path):
        for number, row in rows(file, ROWS_CHECKED_BY_LAUNCHER):
            check_local_row(renamed(row, columns or {}), fmt, path, f"{field} {file} row {number}")
            checked += 1
    if checked == 0:
        raise BadInput(f"{field} {str(path)!r} holds no rows; add training examples")
    return checked
