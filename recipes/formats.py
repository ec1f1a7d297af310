"""The data formats a recipe can name (`data.format`): one table, read by the schema, the launcher
and the training program. An entry says what a row must hold (and an example of one), how the
trainer shapes it for TRL, whether a chat template renders it, whether it carries images, and the
modes it cannot train in. Which methods train on which format: recipes/methods.py.

  text        {"text"}                           -> {"text"}                  plain language modelling
  instruction {"instruction", "input", "output"} -> {"prompt", "completion"}  a user turn and its answer
  messages    {"messages": [{role, content}]}    -> {"messages"}              whole chats
                                                    {"prompt", "completion"}  ... train_on_responses_only
  sharegpt    {"conversations": [{from, value}]} -> the same as messages      ShareGPT chats (human, gpt, ...)
  preference  {"prompt", "chosen", "rejected"}   -> the same                  preference pairs (dpo)
  prompt      {"prompt", "answer"?}              -> {"prompt", "answer"}      a chat to complete (grpo)
  vision      {"messages" with image parts, "images"} -> {"messages", "images"} chats about images

Chats keep their turns in a Layout: the key of the list of turns, each turn's role and text keys, and
what each role name means. messages and sharegpt are one layout each; a recipe's data.chat maps any
other (recipes/schema.py's ChatMapping), and the row checks and the shaping read the layout.

A new format is one entry in FORMATS (and its tests). Below the table: a local data source's files
and rows. The launcher checks a local file's first rows when it validates a recipe; the training
program checks every row as it builds the dataset; both with check_row, so a bad row gets the same
message (file, row number, field) wherever it is found. No torch here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from recipes.errors import BadInput

ROLES = ("system", "user", "assistant", "tool")

Row = dict[str, Any]


@dataclass(frozen=True)
class Layout:
    """Where a chat row keeps its turns: `turns` names the list, each turn's `role` and `content` keys
    hold its role name and its text, and `roles` says what each role name means (one of ROLES)."""

    turns: str
    role: str
    content: str
    roles: Mapping[str, str]

    def mapped(self, turns: str | None, role: str | None, content: str | None, roles: Mapping[str, str]) -> Layout:
        """This layout with a recipe's data.chat applied: keys replaced, role names added (or re-meant)."""
        return Layout(turns or self.turns, role or self.role, content or self.content, {**self.roles, **roles})

    def names_of(self, meaning: str) -> list[str]:
        return [name for name, role in self.roles.items() if role == meaning]


MESSAGES = Layout("messages", "role", "content", {role: role for role in ROLES})
# ShareGPT as hub chat sets hold it (FineTome-100k, SlimOrca, OpenHermes, Glaive and Hermes function
# calling): human and gpt, a system turn, and the tool-call roles (a call is the assistant's turn, its
# result the tool's).
SHAREGPT = Layout(
    "conversations",
    "from",
    "value",
    {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
     "function_call": "assistant", "tool": "tool", "observation": "tool"},
)  # fmt: skip


class ShapeOptions(Protocol):
    """What shaping reads of the recipe's data section (recipes/schema.py's DataConfig)."""

    source: str
    system_prompt: str | None
    train_on_responses_only: bool


@dataclass(frozen=True)
class Shaping:
    """ShapeOptions for one source of several (data.sources): its own path, the recipe's options."""

    source: str
    system_prompt: str | None
    train_on_responses_only: bool


@dataclass(frozen=True)
class Format:
    name: str
    example: str  # one row, for messages
    problem: Callable[[Row, Layout | None], str | None]  # what is wrong with a row (naming the field), or None
    shape: Callable[[Row, ShapeOptions, Layout | None], Row]  # the row as the method's TRL trainer takes it
    fields: tuple[str, ...]  # the shaped row's fields: sources of one recipe must agree on them
    responses_fields: tuple[str, ...] | None = None  # ... under train_on_responses_only, where they differ
    layout: Layout | None = None  # chats as a list of turns: where they are (data.chat maps another)
    chat: bool = False  # rendered with a chat template (the tokenizer's, or data.chat_template)
    images: bool = False  # chats about images: an image-text model, loaded with its processor
    responses_only: bool = False  # data.train_on_responses_only can leave the loss to the replies
    refused_modes: tuple[str, ...] = ()  # modes it cannot train in, refused before launch
    why_refused: str = ""

    def shaped_fields(self, responses_only: bool) -> tuple[str, ...]:
        return self.responses_fields if responses_only and self.responses_fields else self.fields


# ---- what a row must hold


def _text_fields(*fields: str) -> Callable[[Row, Layout | None], str | None]:
    def problem(row: Row, layout: Layout | None = None) -> str | None:
        for field in fields:
            if field not in row:
                return f"has no field {field!r}"
            if not isinstance(row[field], str):
                return f"field {field!r} is {type(row[field]).__name__}, not text"
        return None

    return problem


def _instruction_problem(row: Row, layout: Layout | None = None) -> str | None:
    problem = _text_fields("instruction", "output")(row)
    if problem is None and not isinstance(row.get("input", ""), str | None):
        return "field 'input' is not text"
    return problem


def _prompt_problem(row: Row, layout: Layout | None = None) -> str | None:
    problem = _text_fields("prompt")(row)
    if problem is None and not isinstance(row.get("answer", ""), str | int | float | None):
        return "field 'answer' is not text or a number"
    return problem


def _content_problem(content: Any, key: str, parts_allowed: bool) -> str | None:
    """A turn's text, or (vision) a list of text and image parts."""
    if isinstance(content, str):
        return None
    if not parts_allowed or not isinstance(content, list):
        return f"has no text field {key!r}" + (" (nor a list of parts)" if parts_allowed else "")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if (kind == "text" and isinstance(part.get("text"), str)) or kind == "image":
            continue
        return f'content[{j}] is not a text part {{"type": "text", "text": "..."}} or an image part {{"type": "image"}}'
    return None


def _turn_problem(turn: Any, at: str, layout: Layout, parts_allowed: bool) -> str | None:
    if not isinstance(turn, dict):
        return f"{at} is not an object"
    name = turn.get(layout.role)
    if name not in layout.roles:
        if layout.role not in turn:
            return f"{at} has no field {layout.role!r} (its role; data.chat.role names another key)"
        example = "{" + f"{name}: assistant" + "}"
        return (
            f"{at}.{layout.role} is {name!r}, not one of {', '.join(layout.roles)}; "
            f"data.chat.roles says what another name means, e.g. {example}"
        )
    content = turn.get(layout.content)
    problem = _content_problem(content, layout.content, parts_allowed)
    if problem:
        return f"{at} {problem}"
    if isinstance(content, str) and not content.strip() and layout.roles[name] != "system":
        return f"{at}.{layout.content} is empty ({layout.roles[name]} turns need text); give it text or drop the row"
    return None


def _chat_problem(row: Row, layout: Layout | None = None, parts_allowed: bool = False) -> str | None:
    """A list of turns, each with a known role and its text, one of them the assistant's."""
    layout = layout or MESSAGES
    turns = row.get(layout.turns)
    if not isinstance(turns, list) or not turns:
        return f"field {layout.turns!r} is missing or not a non-empty list"
    for i, turn in enumerate(turns):
        problem = _turn_problem(turn, f"{layout.turns}[{i}]", layout, parts_allowed)
        if problem:
            return problem
    if not any(layout.roles[turn[layout.role]] == "assistant" for turn in turns):
        names = layout.names_of("assistant")
        named = "" if names == ["assistant"] else f" ({', '.join(names)})"
        return f"field {layout.turns!r} has no assistant turn{named} to learn from"
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


def _vision_problem(row: Row, layout: Layout | None = None) -> str | None:
    problem = _chat_problem(row, MESSAGES, parts_allowed=True)
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


def _text(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
    return {"text": row["text"]}


def _preference(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def _instruction(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
    extra = row.get("input") or ""
    user = f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
    return {
        "prompt": [{"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


def _messages(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
    """A chat in TRL's conversational form, whatever its layout: roles as ROLES names them."""
    layout = layout or MESSAGES
    messages = [{"role": layout.roles[t[layout.role]], "content": t[layout.content]} for t in row[layout.turns]]
    if not data.train_on_responses_only:
        return {"messages": messages}
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _prompt(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
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


def _vision(row: Row, data: ShapeOptions, layout: Layout | None = None) -> Row:
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
            ("messages",),
            ("prompt", "completion"),
            layout=MESSAGES,
            chat=True,
            responses_only=True,
        ),
        Format(
            "sharegpt",
            '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]} '
            "(from: system, human, gpt, function_call, observation, tool)",
            _chat_problem,
            _messages,
            ("messages",),
            ("prompt", "completion"),
            layout=SHAREGPT,
            chat=True,
            responses_only=True,
        ),
        Format(
            "instruction",
            '{"instruction": "...", "input": "", "output": "..."}',
            _instruction_problem,
            _instruction,
            ("prompt", "completion"),
            chat=True,
            responses_only=True,
        ),
        Format("text", '{"text": "..."}', _text_fields("text"), _text, ("text",)),
        Format(
            "preference",
            '{"prompt": "...", "chosen": "...", "rejected": "..."}',
            _text_fields("prompt", "chosen", "rejected"),
            _preference,
            ("prompt", "chosen", "rejected"),
        ),
        Format(
            "prompt",
            '{"prompt": "...", "answer": "..."} (answer optional: for rewards that check it)',
            _prompt_problem,
            _prompt,
            ("prompt", "answer"),
            chat=True,
        ),
        Format(
            "vision",
            '{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, '
            '{"role": "assistant", "content": "..."}], "images": ["images/1.png"]} (paths relative to data.source; '
            'or one "image")',
            _vision_problem,
            _vision,
            ("messages", "images"),
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


def row_problem(row: Any, fmt: str, layout: Layout | None = None) -> str | None:
    """None when the row fits the format (a chat: in this layout, default the format's), else what is
    wrong with it (naming the field)."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    return FORMATS[fmt].problem(row, layout or FORMATS[fmt].layout)


def check_row(row: Any, fmt: str, where: str, layout: Layout | None = None, section: str = "data") -> None:
    """BadInput naming the row, its problem and the fix: the recipe line its rows fit, where one does.
    `section`: where the source is in the recipe (data, or data.sources[N])."""
    problem = row_problem(row, fmt, layout)
    if problem is None:
        return
    line = looks_like(row, fmt, section)
    fix = (
        f"these rows fit {line} (set that in the recipe)"
        if line
        else f"each row must look like {FORMATS[fmt].example} (or set {section}.format to what the file holds)"
    )
    raise BadInput(f"{where} {problem}, so it does not match {section}.format {fmt}; {fix}")


def shape_row(row: Row, fmt: str, data: ShapeOptions, layout: Layout | None = None) -> Row:
    return FORMATS[fmt].shape(row, data, layout or FORMATS[fmt].layout)


# ---- what rows look like: the recipe line that fits rows of another format, or chats in another layout

ROLE_KEYS = ("role", "from", "speaker", "author", "sender", "type")  # what a turn's role key is often called


def looks_like(row: Any, refused: str, section: str = "data") -> str | None:
    """The recipe line for a row that data.format `refused` does not take: another format that takes it
    as it is, or a data.chat mapping for chats in a layout of their own; None when nothing fits."""
    if not isinstance(row, dict):
        return None
    for name, other in FORMATS.items():
        if name != refused and other.problem(row, other.layout) is None:
            return f"{section}.format: {name}"
    guess = guess_layout(row)
    base = FORMATS[refused].layout or MESSAGES
    if guess is None:
        return None
    keys = {"turns": base.turns, "role": base.role, "content": base.content}
    parts = [f"{key}: {value}" for key, value in zip(keys, guess[:3], strict=True) if value != keys[key]]
    roles = {name: meaning for name, meaning in guess[3].items() if base.roles.get(name) != meaning}
    if roles:
        parts.append("roles: {" + ", ".join(f"{name}: {meaning}" for name, meaning in roles.items()) + "}")
    if not parts:
        return None  # its layout is the format's own: the row's problem is elsewhere
    chat = f"{section}.chat: {{" + ", ".join(parts) + "}"
    return chat if FORMATS[refused].layout is not None else f"{section}.format: messages with {chat}"


def guess_layout(row: Row) -> tuple[str, str, str, dict[str, str]] | None:
    """(turns, role, content, roles) of a row holding a list of turns with a short role name and a text,
    the role names guessed: known names as ShareGPT means them, others user then assistant by turn."""
    for turns, value in row.items():
        if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
            continue
        keys = [k for k in value[0] if all(isinstance(t.get(k), str) for t in value)]
        if len(keys) < 2:
            continue
        named = [k for k in keys if k.lower() in ROLE_KEYS]
        role = named[0] if named else min(keys, key=lambda k: len({t[k] for t in value}))
        content = max((k for k in keys if k != role), key=lambda k: sum(len(t[k]) for t in value))
        known = {**SHAREGPT.roles, **MESSAGES.roles}
        roles: dict[str, str] = {}
        for name in dict.fromkeys(t[role] for t in value):
            taken = set(roles.values())
            roles[name] = known.get(name.lower()) or ("user" if "user" not in taken else "assistant")
        return turns, role, content, roles
    return None


def refuse_quantized_images_on_cpu(images: bool, load_in: str, gpu: bool) -> None:
    """On the CPU an image-text model (rows with images) loads through transformers, in 16 bits
    (trainer/models.py)."""
    if images and not gpu and load_in != "16bit":
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

        if limit is None:
            yield from enumerate(pq.read_table(path).to_pylist(), start=1)
            return
        first = next(pq.ParquetFile(path).iter_batches(batch_size=max(limit, 1)), None)  # no more than it yields
        yield from enumerate(first.to_pylist()[:limit] if first is not None else [], start=1)


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


def check_local_row(
    row: Any, fmt: str, source: Path, where: str, layout: Layout | None = None, section: str = "data"
) -> None:
    """One row of a local file: its fields, and (images) that its image files are there."""
    check_row(row, fmt, where, layout, section)
    if FORMATS[fmt].images:
        check_images(row, image_root(source), where)


def check_local_file(
    path: Path,
    fmt: str,
    field: str = "data.source",
    columns: dict[str, str] | None = None,
    layout: Layout | None = None,
    section: str = "data",
) -> list[Row]:
    """Check the first rows of each file of a local source (ROWS_CHECKED_BY_LAUNCHER a file); return
    them as checked (columns renamed), up to that many in all: the rows the launcher reports on."""
    checked: list[Row] = []
    count = 0
    for file in data_files(path):
        for number, row in rows(file, ROWS_CHECKED_BY_LAUNCHER):
            row = renamed(row, columns or {})
            check_local_row(row, fmt, path, f"{field} {file} row {number}", layout, section)
            count += 1
            if len(checked) < ROWS_CHECKED_BY_LAUNCHER:
                checked.append(row)
    if count == 0:
        raise BadInput(f"{field} {str(path)!r} holds no rows; add training examples")
    return checked
