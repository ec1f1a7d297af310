"""The data phase, once per machine and once per data: the rows checked, shaped, mixed and held out
(trainer/data.py), then, for the trainers that tokenize text rows themselves (SFTTrainer: sft, cpt),
tokenized into the fields TRL takes as already prepared (input_ids and labels, cut to max_seq_length,
packed when training.packing says), and kept in the cache volume for the next run:

    $HF_HOME/unsloth-recipes/prepared/<shaped key>/                       prepared.json, train/, eval/
    $HF_HOME/unsloth-recipes/prepared/<shaped key>/tokenized-<key>/       prepared.json, train/, eval/

The shaped key is a hash of what changes those rows: the data files' content (a hub dataset: its
cached version's fingerprint), the recipe's data section and seed; the tokenized key adds the
tokenizer (its vocabulary, rules, chat template and special tokens), model.max_seq_length,
training.packing and the versions of transformers, tokenizers and TRL. A folder is written whole or
not at all (a temporary name, then a rename) under a file lock, so two jobs that share the cache
never write one key twice; deleting the folder (or any key in it) only costs a preparation.

Under ddp and fsdp, local rank 0 of each machine prepares, and the other ranks of that machine wait
for the folder it names on torchrun's store (the launch's own key-value store) and read it there,
memory-mapped; they check, shape and tokenize nothing. Without that store (one process, or a launch
by other means) each rank prepares, and the lock lets the first write and the rest read.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import tokenizers
import torch.distributed
import transformers
import trl
from filelock import FileLock
from huggingface_hub import constants
from trl.data_utils import common_prefix_length, pack_dataset

from recipes import atomic, formats
from recipes.schema import DataSource, Recipe
from trainer import data

VERSION = 1  # of what preparation makes: raise it when that changes, and every key changes with it
TOKENIZED_METHODS = ("sft", "cpt")  # their trainer (SFTTrainer) takes input_ids and labels as prepared
POLL_S = 0.2


def cache_root() -> Path:
    """Where prepared datasets are kept: under HF_HOME (the image: its cache volume)."""
    return Path(constants.HF_HOME) / "unsloth-recipes" / "prepared"


@dataclass
class Stage:
    """One stage's result on this rank: the datasets, where they are kept, and what this rank did."""

    train: Any
    eval: Any
    folder: Path
    done: str  # "built" here, "reused" from the cache, or "read" where local rank 0 put it
    seconds: float  # including, for a rank that read, its wait
    rows: int = 0  # rows this rank checked and shaped, or tokenized


@dataclass
class Record:
    """The data phase on this rank, for metrics.json."""

    stages: dict[str, Stage] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log: what each stage did here, and where its rows are."""
        said = {"built": "built", "reused": "reused from the cache", "read": "read as local rank 0 prepared them"}
        parts = [
            f"{name} rows {said[s.done]}"
            + (f" ({s.rows} rows)" if s.done == "built" else "")
            + f" in {s.seconds:.2f} s"
            for name, s in self.stages.items()
        ]
        return "; ".join(parts) + f"; {next(reversed(self.stages.values())).folder}"

    def as_json(self, local_rank: int) -> dict[str, Any]:
        return {
            "local_rank": local_rank,
            "seconds": round(sum(s.seconds for s in self.stages.values()), 3),
            **{
                name: {"folder": str(s.folder), "done": s.done, "rows": s.rows, "seconds": round(s.seconds, 3)}
                for name, s in self.stages.items()
            },
        }


class Handoff:
    """How the ranks of one machine share what local rank 0 prepares: under torchrun, its store,
    under keys of this launch attempt and this machine; otherwise each rank prepares alone."""

    def __init__(self, world_size: int, local_rank: int, environ=os.environ) -> None:
        self.store = None
        if world_size > 1 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            self.store = torch.distributed.TCPStore(
                environ["MASTER_ADDR"],
                int(environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=60),
            )
        self.prepares = self.store is None or local_rank == 0
        self.prefix = (
            f"unsloth-recipes/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{environ.get('GROUP_RANK', '0')}"
        )

    def post(self, stage: str, folder: Path) -> None:
        if self.store is not None:
            self.store.set(f"{self.prefix}/{stage}", str(folder))

    def wait(self, stage: str) -> Path:
        """The folder local rank 0 prepared. If that rank fails, torchrun ends this one."""
        key = f"{self.prefix}/{stage}"
        assert self.store is not None
        while not self.store.check([key]):
            time.sleep(POLL_S)
        return Path(self.store.get(key).decode())


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def source_fingerprint(source: DataSource) -> list[Any]:
    """What a source's rows come from: each local file's content, or the hub dataset's cached version."""
    prints: list[Any] = []
    for where, split in ((source.source, source.split), (source.eval_split, source.eval_split)):
        if where is None:
            continue
        if Path(where).exists():
            prints += [(str(f), file_digest(f)) for f in formats.data_files(Path(where))]
        else:
            loaded = data.load_rows(source, split=split)
            prints.append((source.source, source.subset, split, loaded._fingerprint))
    return prints


def shaped_key(recipe: Recipe) -> str:
    return digest(
        {
            "version": VERSION,
            "data": recipe.data.model_dump(mode="json"),
            "seed": recipe.training.seed,
            "inputs": [source_fingerprint(s) for s in recipe.data.datasets],
        }
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A tokenizer's identity as tokenizing sees it: its vocabulary and rules (the fast tokenizer's
    JSON), its chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return digest(
        {
            "class": type(tokenizer).__name__,
            "backend": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
            "vocab": None if backend is not None else digest(sorted(tokenizer.get_vocab().items())),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        }
    )


def packs(recipe: Recipe) -> bool:
    """training.packing as the trainer applies it: Unsloth's CPU backend turns packing off, since SDPA
    there would attend across the rows packed into one sequence (unsloth_zoo/cpu/trainer.py), so rows
    are packed on GPUs only."""
    return recipe.training.packing and torch.cuda.is_available()


def tokenized_key(recipe: Recipe, shaped: str, tokenizer) -> str:
    return digest(
        {
            "version": VERSION,
            "shaped": shaped,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_seq_length": recipe.model.max_seq_length,
            "packing": packs(recipe),
            "packing_strategy": trl.SFTConfig.packing_strategy,
            "versions": [transformers.__version__, tokenizers.__version__, trl.__version__],
        }
    )


# ---- keeping a stage


def ready(folder: Path) -> bool:
    return (folder / "prepared.json").is_file()


def save(folder: Path, train, eval_rows, about: dict[str, Any]) -> None:
    """The datasets and what they are, whole or not at all."""
    with atomic.folder(folder) as tmp:
        tmp.mkdir(parents=True)
        train.save_to_disk(str(tmp / "train"))
        if eval_rows is not None:
            eval_rows.save_to_disk(str(tmp / "eval"))
        atomic.write_text(tmp / "prepared.json", json.dumps(about, indent=2) + "\n")


def load(folder: Path):
    train = datasets.load_from_disk(str(folder / "train"))
    held_out = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return train, held_out


def stage(name: str, folder: Path, handoff: Handoff, make, started: float) -> Stage:
    """Prepare (or reuse) the stage's folder on local rank 0, and hand it to the others; `make()`
    -> (train, eval, rows, about). Its time counts from `started` (the key's hashing included); a rank
    that waits counts its wait."""
    if not handoff.prepares:
        folder = handoff.wait(name)
        train, held_out = load(folder)
        return Stage(train, held_out, folder, "read", time.time() - started)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rows, built = 0, False
    with FileLock(str(folder) + ".lock"):
        if not ready(folder):
            train, held_out, rows, about = make()
            save(folder, train, held_out, about | {"seconds": round(time.time() - started, 3)})
            built = True
    handoff.post(name, folder)
    train, held_out = load(folder)  # memory-mapped, as the other ranks read it
    return Stage(train, held_out, folder, "built" if built else "reused", time.time() - started, rows)


def shaped(recipe: Recipe, handoff: Handoff) -> Stage:
    """Every row checked and shaped, the sources mixed, the evaluation rows held out."""
    started = time.time()
    key = shaped_key(recipe) if handoff.prepares else ""

    def make():
        train, held_out = data.build(recipe.data, recipe.training.seed)
        about = {"key": key, "data": recipe.data.model_dump(mode="json"), "seed": recipe.training.seed,
                 "rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0}  # fmt: skip
        return train, held_out, len(train) + (len(held_out) if held_out is not None else 0), about

    done = stage("shaped", cache_root() / key, handoff, make, started)
    done.train, done.eval = data.with_images(done.train), data.with_images(done.eval)
    return done


def held_out(recipe: Recipe, count: int) -> tuple[list, str]:
    """Up to `count` shaped rows the run did not train on, and where they come from (an export's
    check scores them): its evaluation rows, else a seeded sample of its training rows. The rows the
    run prepared, from the cache where it kept them."""
    rows = shaped(recipe, Handoff(1, 0))
    seed = recipe.training.seed
    if rows.eval is not None:
        fraction = recipe.data.eval_fraction
        how = f"data.eval_fraction {fraction}" if fraction is not None else "the sources' eval_split"
        sample, origin = rows.eval, f"the run's evaluation rows ({how})"
    else:
        sample = rows.train.shuffle(seed=seed)
        origin = f"a seeded sample of the training rows (seed {seed}): the run has no evaluation rows"
    return list(sample.select(range(min(count, len(sample))))), origin


def tokenizes(recipe: Recipe) -> bool:
    """SFTTrainer's text rows: prepared here. Preference, prompt and image rows are the trainer's."""
    return recipe.training.method in TOKENIZED_METHODS and not recipe.vision


def tokenized(recipe: Recipe, shaped_rows: Stage, tokenizer, handoff: Handoff) -> Stage:
    started = time.time()
    key = tokenized_key(recipe, shaped_rows.folder.name, tokenizer) if handoff.prepares else ""
    counter = Counter()

    def make():
        train = tokenize(shaped_rows.train, tokenizer, recipe, counter)
        held_out = tokenize(shaped_rows.eval, tokenizer, recipe, counter) if shaped_rows.eval is not None else None
        about = {"key": key, "shaped": shaped_rows.folder.name, "model": recipe.model.name,
                 "max_seq_length": recipe.model.max_seq_length, "packing": packs(recipe),
                 "rows": len(train), "eval_rows": len(held_out) if held_out is not None else 0}  # fmt: skip
        return train, held_out, counter.rows, about

    done = stage("tokenized", shaped_rows.folder / f"tokenized-{key}", handoff, make, started)
    if not packs(recipe):
        # Every row is cut to max_seq_length: said so to Unsloth, which then keeps its padding-free
        # batches on a GPU (unsloth/models/rl.py reads `_unsloth_truncated_to`) instead of scanning
        # every row on every rank and falling back to padded batches.
        for rows in (done.train, done.eval):
            if rows is not None:
                rows._unsloth_truncated_to = recipe.model.max_seq_length
    return done


# ---- tokenizing as TRL's SFTTrainer would (trl/trainer/sft_trainer.py, _prepare_dataset)


@dataclass
class Counter:
    """Rows this process tokenized (what metrics.json's data record shows for each rank)."""

    rows: int = 0


def _render(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_rows(batch: dict[str, list], tokenizer, length: int | None, counter: Counter) -> dict[str, list]:
    """input_ids and labels (-100: no loss) of a batch of shaped rows. A chat is rendered by the
    tokenizer's chat template and tokenized without adding special tokens (the template writes them:
    transformers' apply_chat_template); prompt/completion chats learn the completion only, from where
    the prompt rendered alone (with the generation prompt) stops matching; text ends in EOS. Cut to
    `length` (None: packed later), rows left with nothing to learn dropped. Batched: the tokenizer
    encodes a batch on every core."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    counter.rows += len(rows)
    encode = tokenizer  # __call__: the fast tokenizer's batch encoding
    if batch.get("completion") is not None:
        prompts = encode([_render(tokenizer, r["prompt"], True) for r in rows], add_special_tokens=False)["input_ids"]
        chats = [_render(tokenizer, r["prompt"] + r["completion"]) for r in rows]
        ids = encode(chats, add_special_tokens=False)["input_ids"]
        starts = [common_prefix_length(p, i) for p, i in zip(prompts, ids, strict=True)]
        labels = [[-100] * start + list(i[start:]) for start, i in zip(starts, ids, strict=True)]
    elif batch.get("messages") is not None:
        ids = encode([_render(tokenizer, r["messages"]) for r in rows], add_special_tokens=False)["input_ids"]
        labels = [list(i) for i in ids]
    else:
        eos = tokenizer.eos_token
        ids = encode(text=[r["text"] if r["text"].endswith(eos) else r["text"] + eos for r in rows])["input_ids"]
        labels = [list(i) for i in ids]
    if length is not None:
        ids, labels = [i[:length] for i in ids], [label[:length] for label in labels]
    kept = [n for n, label in enumerate(labels) if length is None or any(t != -100 for t in label)]
    return {"input_ids": [list(ids[n]) for n in kept], "labels": [labels[n] for n in kept]}


def tokenize(rows, tokenizer, recipe: Recipe, counter: Counter):
    """The shaped rows as SFTTrainer prepares them: tokenized, cut to max_seq_length (rows left with no
    label dropped), or packed into sequences of that length (TRL's pack_dataset, its default strategy)."""
    length = recipe.model.max_seq_length
    packing = packs(recipe)
    tokenized = rows.map(
        tokenize_rows, batched=True, batch_size=1000,
        fn_kwargs={"tokenizer": tokenizer, "length": None if packing else length, "counter": counter},
        remove_columns=rows.column_names, keep_in_memory=True, desc="Preparing (tokenizing) rows",
        new_fingerprint="tokenized",  # kept in memory, not in datasets' cache: no need to hash the tokenizer
    )  # fmt: skip
    if packing:
        return pack_dataset(tokenized, length, trl.SFTConfig.packing_strategy, {"keep_in_memory": True})
    return tokenized
