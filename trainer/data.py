"""The data phase's rows: each source's rows loaded (a local file or folder, or a split of a hub
dataset), every row checked and shaped for the method's TRL trainer by its format's entry in
recipes/formats.py, the sources mixed by their shares, and the evaluation rows held out. A bad row is
named before any model loads. trainer/prepare.py runs this once per machine and keeps the result.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import datasets

from recipes import formats
from recipes.schema import DataConfig, DataSource

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # datasets' builder per file


def load_rows(source: DataSource, path: str | None = None, split: str | None = None):
    """-> a datasets.Dataset of a source's raw rows (columns renamed): its training rows, or with
    `path` / `split` its evaluation rows (a local file or folder, or a split of the hub dataset).
    A local dataset of images' rows comes as a list."""
    where, max_samples = (path, None) if path or split else (source.source, source.max_samples)
    where = where or source.source
    if Path(where).exists() and formats.FORMATS[source.format].images:
        # Read here, not by datasets: a chat's contents may mix text and lists of parts, which
        # Arrow cannot hold in one column; the shaped rows are uniform (formats._parts).
        every = (row for f in formats.data_files(Path(where)) for _, row in formats.rows(f))
        return [formats.renamed(row, source.columns) for row in itertools.islice(every, max_samples)]
    if Path(where).exists():
        files = [str(p) for p in formats.data_files(Path(where))]
        dataset = datasets.load_dataset(LOADERS[Path(files[0]).suffix.lower()], data_files=files, split="train")
    else:
        dataset = datasets.load_dataset(where, source.subset, split=split or source.split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    if source.columns:
        dataset = dataset.rename_columns({k: v for k, v in source.columns.items() if k in dataset.column_names})
    return dataset


def checked_and_shaped(raw, source: DataSource, options: formats.ShapeOptions, field: str, where: str, section: str):
    """Every row checked (as the launcher checks a local file's first rows: the same messages) and
    shaped. Images stay paths or undecoded bytes here; with_images decodes them when they are read."""
    fmt, layout = source.format, source.layout
    images, local = formats.FORMATS[fmt].images, Path(where).exists()
    if images and not local:
        raw = undecoded(raw)
    for number, row in enumerate(raw, start=1):
        if local:
            formats.check_local_row(row, fmt, Path(where), f"{field} {where} row {number}", layout, section)
        else:
            formats.check_row(row, fmt, f"{field} {where} row {number}", layout, section)

    def shape(row):
        return formats.shape_row(row, fmt, options, layout)

    if images and local:
        return datasets.Dataset.from_list([shape(row) for row in raw])
    # In memory: the prepared dataset is written once, by prepare.py, not also into datasets' cache.
    return raw.map(shape, remove_columns=raw.column_names, keep_in_memory=True)


def with_images(dataset):
    """Paths (local data) or images (a hub dataset's) alike: decoded to PIL images when read."""
    if dataset is None or "images" not in dataset.column_names:
        return dataset
    return dataset.cast_column("images", datasets.Sequence(datasets.Image()))


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


def shaped_source(data: DataConfig, index: int):
    """-> (training rows, its own evaluation rows or None) of one source, checked and shaped."""
    source, section = data.datasets[index], data.section(index)
    options = formats.Shaping(source.source, data.system_prompt, data.train_on_responses_only)
    train = checked_and_shaped(load_rows(source), source, options, f"{section}.source", source.source, section)
    if source.eval_split is None:
        return train, None
    local = Path(source.eval_split).exists()
    held_out = load_rows(source, path=source.eval_split if local else None, split=None if local else source.eval_split)
    if local:  # image paths are relative to this file or folder
        options = formats.Shaping(source.eval_split, data.system_prompt, data.train_on_responses_only)
    return train, checked_and_shaped(held_out, source, options, f"{section}.eval_split", source.eval_split, section)


def mixed(parts: list, data: DataConfig, seed: int):
    """The sources' rows in one dataset, each source's share taken as data.shares says (a seeded
    sample where it takes fewer rows than the source has), in a seeded order. One source that
    takes every row stays as it is."""
    if len(parts) == 1 and data.datasets[0].rows is None:
        return parts[0]
    counts = data.shares([len(part) for part in parts])
    features = parts[0].features
    taken = [
        (part if count == len(part) else part.shuffle(seed=seed).select(range(count))).cast(features)
        for part, count in zip(parts, counts, strict=True)
    ]
    return datasets.concatenate_datasets(taken).shuffle(seed=seed).flatten_indices(keep_in_memory=True)


def build(data: DataConfig, seed: int):
    """-> (training rows, evaluation rows or None), every row checked and shaped for the trainer.
    The evaluation rows are the sources' eval_split rows, or a seeded data.eval_fraction of the
    mixed training rows, which are then left out of training."""
    shaped = [shaped_source(data, index) for index in range(len(data.datasets))]
    train = mixed([train for train, _ in shaped], data, seed)
    if data.eval_fraction is not None:
        halves = train.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        return halves["train"], halves["test"]
    held_out = [rows for _, rows in shaped if rows is not None]
    if not held_out:
        return train, None
    features = held_out[0].features
    return train, datasets.concatenate_datasets([rows.cast(features) for rows in held_out])
