"""What a row of each data format must hold, checked before any model loads.

The launcher checks a local file's first rows when it validates a recipe; the training
program checks every row as it builds the dataset. Both use `check_row`, so a bad row gets
the same message (file, row number, field) wherever it is found. No torch here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recipes.errors import BadInput

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
ROLES = ("system", "user", "assistant", "tool")

# format -> (required string fields, example row for the error message)
REQUIRED: dict[str, tuple[tuple[str, ...], str]] = {
    "text": (("text",), '{"text": "..."}'),
    "instruction": (("instruction", "output"), '{"instruction": "...", "input": "", "output": "..."}'),
    "preference": (("prompt", "chosen", "rejected"), '{"prompt": "...", "chosen": "...", "rejected": "..."}'),
    "prompt": (("prompt",), '{"prompt": "...", "answer": "..."} (answer optional: for rewards that check it)'),
    "messages": ((), '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'),
    "vision": (
        (),
        '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, '
        '{"role": "assistant", "content": "..."}], "images": ["images/1.png"]} (paths relative to data.source; '
        'or one "image")',
    ),
}

ROWS_CHECKED_BY_LAUNCHER = 1000


def looks_local(source: str) -> bool:
    """A data source written as a path (rather than a hub id like org/name)."""
    return source.startswith(("/", "./", "../", "~")) or source.endswith(DATA_SUFFIXES) or Path(source).exists()


def row_problem(row: Any, fmt: str) -> str | None:
    """None when the row fits the format, else what is wrong with it (naming the field)."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    fields, _ = REQUIRED[fmt]
    for field in fields:
        if field not in row:
            return f"has no field {field!r}"
        if not isinstance(row[field], str):
            return f"field {field!r} is {type(row[field]).__name__}, not text"
    if fmt == "instruction" and not isinstance(row.get("input", ""), str | None):
        return "field 'input' is not text"
    if fmt == "prompt" and not isinstance(row.get("answer", ""), str | int | float | None):
        return "field 'answer' is not text or a number"
    if fmt in ("messages", "vision"):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return "field 'messages' is missing or not a non-empty list"
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return f"messages[{i}] is not an object"
            problem = _content_problem(message.get("content"), parts_allowed=fmt == "vision")
            if problem:
                return f"messages[{i}] {problem}"
            if message.get("role") not in ROLES:
                return f"messages[{i}].role is {message.get('role')!r}, not one of {', '.join(ROLES)}"
        if not any(m["role"] == "assistant" for m in messages):
            return "field 'messages' has no assistant turn to learn from"
    if fmt == "vision":
        images = images_of(row)
        if not isinstance(images, list) or not images:
            return "field 'images' is missing or not a non-empty list of images"
        for i, image in enumerate(images):
            if not _is_image(image):
                return f"images[{i}] is {type(image).__name__}, not an image path (or an image of a hub dataset)"
        slots = sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
        if slots and slots != len(images):
            return f"has {slots} image parts in its messages but {len(images)} images; give one image per part"
    return None


def images_of(row: dict[str, Any]) -> Any:
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


def image_root(source: Path) -> Path:
    """Where a local vision dataset's relative image paths start: its folder, or the file's folder."""
    return source if source.is_dir() else source.parent


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


def check_row(row: Any, fmt: str, where: str) -> None:
    problem = row_problem(row, fmt)
    if problem is not None:
        raise BadInput(
            f"{where} {problem}, so it does not match data.format {fmt}; "
            f"each row must look like {REQUIRED[fmt][1]} (or set data.format to what the file holds)"
        )


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


def check_local_file(path: Path, fmt: str, field: str = "data.source", columns: dict[str, str] | None = None) -> int:
    """Check the first rows of a local file or folder; return how many rows were checked."""
    checked = 0
    for file in data_files(path):
        for number, row in rows(file, ROWS_CHECKED_BY_LAUNCHER):
            row = renamed(row, columns or {})
            check_row(row, fmt, f"{field} {file} row {number}")
            if fmt == "vision":
                check_images(row, image_root(path), f"{field} {file} row {number}")
            checked += 1
    if checked == 0:
        raise BadInput(f"{field} {str(path)!r} holds no rows; add training examples")
    return checked
