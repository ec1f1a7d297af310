"""The data phase: load a recipe's rows (a local file or folder, or a split of a hub dataset), check
every row and shape it for the method's TRL trainer, by its format's entry in recipes/formats.py,
and hold out the evaluation rows. A bad row is named before any model loads.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import datasets

from recipes import formats
from recipes.schema import DataConfig

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # datasets' builder per file


def load_rows(
    source: str,
    split: str,
    max_samples: int | None = None,
    columns: dict[str, str] | None = None,
    subset: str | None = None,
    fmt: str | None = None,
):
    """-> a datasets.Dataset of the raw rows (a local file or folder, or a split of a hub dataset);
    a local dataset of images' rows as a list."""
    if Path(source).exists() and fmt is not None and formats.FORMATS[fmt].images:
        # Read here, not by datasets: a chat's contents may mix text and lists of parts, which
        # Arrow cannot hold in one column; the shaped rows are uniform (formats._parts).
        every = (row for f in formats.data_files(Path(source)) for _, row in formats.rows(f))
        return [formats.renamed(row, columns or {}) for row in itertools.islice(every, max_samples)]
    if Path(source).exists():
        files = [str(p) for p in formats.data_files(Path(source))]
        dataset = datasets.load_dataset(LOADERS[Path(files[0]).suffix.lower()], data_files=files, split="train")
    else:
        dataset = datasets.load_dataset(source, subset, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if columns:
        dataset = dataset.rename_columns({k: v for k, v in columns.items() if k in dataset.column_names})
    return dataset


def _checked_and_shaped(raw, data: DataConfig, field: str, where: str):
    images = formats.FORMATS[data.format].images
    local = Path(where).exists()
    if images and not local:
        raw = undecoded(raw)
    for number, row in enumerate(raw, start=1):
        if local:
            formats.check_local_row(row, data.format, Path(where), f"{field} {where} row {number}")
        else:
            formats.check_row(row, data.format, f"{field} {where} row {number}")
    if not images:
        return raw.map(lambda row: formats.shape_row(row, data.format, data), remove_columns=raw.column_names)
    if local:
        data = data.model_copy(update={"source": where})  # image paths are relative to this file or folder
        shaped = datasets.Dataset.from_list([formats.shape_row(row, data.format, data) for row in raw])
    else:
        shaped = raw.map(lambda row: formats.shape_row(row, data.format, data), remove_columns=raw.column_names)
    # Paths (local data) or images (a hub dataset's) alike: decoded to PIL images when read.
    return shaped.cast_column("images", datasets.Sequence(datasets.Image()))


def undecoded(raw):
    """A hub vision dataset whose images stay encoded ({"bytes", "path"}) while rows are checked and
    shaped: decoding every image there (and encoding it again after map) would cost minutes."""
    features = getattr(raw, "features", {})
    inner = getattr(features.get("images"), "feature", None)
    if isinstance(inner, datasets.Image):
        return raw.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    if isinstance(features.get("image"), datasets.Image):
        return raw.cast_column("image", datasets.Image(decode=False))
    return raw


def build(data: DataConfig, seed: int):
    """-> (training rows, evaluation rows or None), every row checked and shaped for the trainer.
    The evaluation rows are data.eval_split, or a seeded data.eval_fraction of the training rows,
    which are then left out of training."""
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


def held_out(data: DataConfig, seed: int, count: int) -> tuple[list, str]:
    """Up to `count` shaped rows the run did not train on, and where they come from: its evaluation
    rows (build()'s, in the same order: a seeded split depends only on the number of rows, so it is
    taken on the raw rows and only those kept are shaped), else a seeded sample of its training rows."""
    if data.eval_split is not None:
        local = Path(data.eval_split).exists()
        source = data.eval_split if local else data.source
        raw = load_rows(source, data.eval_split, columns=data.columns, subset=data.subset, fmt=data.format)
        field, where = "data.eval_split", data.eval_split
        origin = f"the run's evaluation rows (data.eval_split {data.eval_split})"
    else:
        raw = load_rows(data.source, data.split, data.max_samples, data.columns, data.subset, data.format)
        field, where = "data.source", data.source
        if data.eval_fraction is not None:
            raw = raw.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)["test"]
            origin = f"the run's evaluation rows (data.eval_fraction {data.eval_fraction})"
        else:
            raw = raw.shuffle(seed=seed)
            origin = f"a seeded sample of the training rows (seed {seed}): the run has no evaluation rows"
    raw = raw.select(range(min(count, len(raw))))
    return list(_checked_and_shaped(raw, data, field, where)), origin
