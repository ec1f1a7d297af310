"""The check of an export: does the exported model still answer as the trained one did?

A GGUF export can "succeed" and answer garbage in llama.cpp or Ollama (a chat template or tokenizer
that differs from training's, a wrong merge). After `export` and after a run's `output.save`, each
merged_16bit or GGUF target is checked against the trained model (the base with the adapter, or
model/ after full fine-tuning), both in 16 bits:

  perplexity  on held-out rows (the run's evaluation rows, else a seeded sample of its training
              rows), rendered with the chat template as training rendered them, as one plain text.
              It is scored as llama.cpp's llama-perplexity scores a file: the text's tokens (made by
              each model's own tokenizer, the special tokens' text read as plain text) cut into
              chunks of n_ctx, each chunk's first token replaced by BOS where the tokenizer adds one,
              and the second half of each chunk scored. A GGUF file is scored by the pinned
              llama-perplexity itself, merged_16bit and the trained model so through transformers:
              the ratio of the export's to the trained model's must stay within the target's
              tolerance (recipes/exports.py's CHECK_TOLERANCE).
  prompts     the first user turns of a few held-out rows, rendered by the export's own chat template
              (a GGUF file's embedded one, by llama.cpp's llama-completion with --jinja, as llama.cpp's
              chat tools render it) must give the very tokens training's template gives; the export's
              greedy answers are recorded beside the trained model's.

Each target's figures become its `check` object in exports.json; a target outside its tolerance, or
whose prompts render differently, fails the export (exit 1, one line per target: failure_lines).
"""

from __future__ import annotations

import gc
import math
import os
import re
import select
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import PeftModel

from recipes import exports
from recipes.runs import Run
from trainer import prepare

ROWS = 24  # held-out rows scored (fewer when the run has fewer)
PROMPTS = 4  # of them, whose first user turn the export answers
ANSWER_TOKENS = 16
MAX_CONTEXT = 256  # n_ctx: at most this, at most the model's max_seq_length
MAX_CHUNKS = 8  # a few thousand tokens at most: seconds on tiny models, minutes on an 8B on the CPU
# llama-perplexity's logits file holds 2 bytes per vocabulary entry per scored token: with a large
# vocabulary, fewer chunks keep it to this.
MAX_LOGITS_BYTES = 256 * 1024**2
TOOL_TIMEOUT_S = 3600


@dataclass
class Material:
    """What every target of a run is checked on, and the trained model's figures on it."""

    origin: str  # where the rows come from
    rows: int
    text: str  # the held-out rows, rendered
    ids: list[int]  # the trained tokenizer's tokens of `text`, as llama-perplexity tokenizes it
    n_ctx: int
    chunks: int
    prompts: list[Any]  # chat messages (system and first user turn), or the start of a text row
    chat: bool
    prompt_ids: list[list[int]] = field(default_factory=list)  # training's rendering of each prompt
    answers: list[str] = field(default_factory=list)  # the trained model's greedy answers
    perplexity: float = math.nan  # the trained model's


def render(row: dict[str, Any], tokenizer) -> str:
    """A shaped row (recipes/formats.py) as the trainer's text: chats through the chat template."""
    if "text" in row:
        return row["text"]
    if "messages" in row:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if isinstance(row.get("completion"), list):  # instruction, or messages answered only
        return tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    if "chosen" in row:  # preference pairs are plain text: the prompt, then the preferred answer
        return row["prompt"] + row["chosen"]
    answer = [{"role": "assistant", "content": row["answer"]}] if row.get("answer") else []
    return tokenizer.apply_chat_template(row["prompt"] + answer, tokenize=False, add_generation_prompt=not answer)


def prompt_of(row: dict[str, Any]) -> tuple[Any, bool]:
    """(prompt, chat): a chat's system message and first user turn, or a text's first words."""
    messages = row.get("messages") or (row["prompt"] if isinstance(row.get("prompt"), list) else None)
    if messages is not None:
        system = [m for m in messages[:1] if m["role"] == "system"]
        return [*system, next(m for m in messages if m["role"] == "user")], True
    text = row.get("text") or row["prompt"]
    return text[:80].rsplit(" ", 1)[0] if len(text) > 80 else text, False


def material(run: Run, tokenizer) -> Material:
    recipe = run.recipe
    rows, origin = prepare.held_out(recipe, ROWS)
    text = "\n".join(render(row, tokenizer) for row in rows)
    ids = tokens_of(tokenizer, text)
    n_ctx = min(recipe.model.max_seq_length, MAX_CONTEXT)
    while n_ctx > 16 and len(ids) < 2 * n_ctx:
        n_ctx //= 2
    row_bytes = (n_ctx - n_ctx // 2 - 1) * 2 * (len(tokenizer) + 4)  # per chunk, in the logits file
    chunks = max(1, min(len(ids) // n_ctx, MAX_CHUNKS, MAX_LOGITS_BYTES // row_bytes))
    prompts = [prompt_of(row) for row in rows[:PROMPTS]]
    chat = bool(prompts) and prompts[0][1]
    return Material(origin, len(rows), text, ids, n_ctx, chunks, [p for p, _ in prompts], chat)


def tokens_of(tokenizer, text: str) -> list[int]:
    """The text's tokens as llama-perplexity makes them of a file: the special tokens' text read as
    plain text, a BOS first where the tokenizer adds one."""
    return tokenizer(text, add_special_tokens=True, split_special_tokens=True, verbose=False)["input_ids"]


def bos_of(tokenizer) -> int | None:
    """The BOS that llama-perplexity puts first in every chunk, where the tokenizer adds one."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


# ---- through transformers


def load(folder: Path | str, adapter: Path | None, trust_remote_code: bool):
    """A model in bfloat16 on the CPU (the merge's own precision), with the adapter unmerged."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, device_map="cpu", trust_remote_code=trust_remote_code
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@torch.no_grad()
def perplexity(model, tokenizer, m: Material) -> float:
    """llama-perplexity's figure, computed the same way (see the module's docstring), of the text as
    this model's own tokenizer makes it (as llama.cpp tokenizes it with a GGUF file's)."""
    ids, bos = tokens_of(tokenizer, m.text), bos_of(tokenizer)
    nll, count = 0.0, 0
    first = m.n_ctx // 2
    for c in range(min(m.chunks, len(ids) // m.n_ctx)):
        chunk = list(ids[c * m.n_ctx : (c + 1) * m.n_ctx])
        if bos is not None:
            chunk[0] = bos
        logits = model(torch.tensor([chunk])).logits[0, first : m.n_ctx - 1].float()
        targets = torch.tensor(chunk[first + 1 : m.n_ctx])
        nll -= torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
        count += m.n_ctx - first - 1
    return math.exp(nll / count) if count else math.inf  # too few tokens: a tokenizer unlike training's


def prompt_ids(tokenizer, prompt: Any, chat: bool) -> list[int]:
    if chat:
        rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(rendered["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def answer(model, tokenizer, ids: list[int]) -> str:
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=ANSWER_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def figures(model, tokenizer, m: Material) -> tuple[float, list[list[int]], list[str]]:
    """(perplexity, each prompt's tokens, each answer) of a transformers model."""
    rendered = [prompt_ids(tokenizer, p, m.chat) for p in m.prompts]
    return perplexity(model, tokenizer, m), rendered, [answer(model, tokenizer, ids) for ids in rendered]


def trained(run: Run) -> Material:
    """The material, with the trained model's figures on it."""
    full = run.recipe.model.full_finetuning
    weights = run.trained  # export saved it first, from the newest checkpoint where training stopped early
    assert weights is not None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(weights), trust_remote_code=run.trust_remote_code)
    m = material(run, tokenizer)
    model = load(weights if full else run.base_model(), None if full else weights, run.trust_remote_code)
    m.perplexity, m.prompt_ids, m.answers = figures(model, tokenizer, m)
    del model
    gc.collect()
    return m


def check_merged(folder: Path, m: Material, trust_remote_code: bool) -> dict[str, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    model = load(folder, None, trust_remote_code)
    ppl, rendered, answers = figures(model, tokenizer, m)
    del model
    gc.collect()
    return verdict("merged_16bit", m, ppl, rendered, answers, "transformers, bfloat16")


# ---- through llama.cpp
#
# llama.cpp's tools log through a queue that a thread of theirs writes out, and they exit without
# waiting for it (common/log.cpp: "logs may be lost if not flushed before the program exits"): on a
# busy machine the last lines, their results among them, are lost as often as one run in three. So
# nothing here is read from a tool's output once it has exited: llama-perplexity writes its results
# to a file (--save-all-logits), and llama-completion is read while it waits for the next turn.


def llama_perplexity(gguf: Path, m: Material, llama_cpp: Path, scratch: Path) -> tuple[float, list[int]]:
    """(perplexity, the tokens llama.cpp made of the text), from llama-perplexity's logits file."""
    text, logits = scratch / "held-out.txt", scratch / "logits.bin"
    text.write_text(m.text, encoding="utf-8")
    size = str(m.n_ctx)
    args = [
        "-m",
        str(gguf),
        "-f",
        str(text),
        "-c",
        size,
        "-b",
        size,
        "--chunks",
        str(m.chunks),
        "--save-all-logits",
        str(logits),
    ]
    done = subprocess.run(
        [str(llama_cpp / "llama-perplexity"), *args],
        capture_output=True,
        text=True,
        errors="replace",
        stdin=subprocess.DEVNULL,
        timeout=TOOL_TIMEOUT_S,
    )
    if done.returncode != 0 or not logits.is_file():
        raise ToolFailed("llama-perplexity", done.returncode, done.stderr + done.stdout)
    try:
        return read_logits(logits, m)
    except (struct.error, ValueError):  # it stops early, with a header only, when the text is short
        raise ToolFailed(
            "llama-perplexity",
            done.returncode,
            f"it scored nothing: llama.cpp made fewer than {2 * m.n_ctx} "
            f"tokens of the held-out text, which training's tokenizer makes {len(m.ids)} of",
        ) from None
    finally:
        logits.unlink()


def read_logits(path: Path, m: Material) -> tuple[float, list[int]]:
    """Perplexity from llama-perplexity's logits file (tools/perplexity/perplexity.cpp: "_logits_",
    n_ctx, n_vocab, n_chunk, the tokens, then per scored token a row of 16-bit log-probabilities:
    float scale, float log-probability of the lowest logit kept, then one step count per token)."""
    raw = path.read_bytes()
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<3i", raw, 8)
    if n_chunk < 1 or n_ctx != m.n_ctx:
        raise ValueError(f"{path.name}: {n_chunk} chunks of {n_ctx}")
    tokens = np.frombuffer(raw, dtype="<i4", count=n_chunk * n_ctx, offset=20)
    row = 2 * ((n_vocab + 1) // 2) + 4  # uint16s per scored token
    first = n_ctx // 2
    scored = n_ctx - 1 - first
    rows = np.frombuffer(raw, dtype="<u2", offset=20 + 4 * tokens.size).reshape(n_chunk * scored, row)
    head = rows[:, :4].copy().view("<f4")  # scale, min_log_prob
    targets = tokens.reshape(n_chunk, n_ctx)[:, first + 1 :].reshape(-1)
    steps = rows[np.arange(rows.shape[0]), 4 + targets].astype(np.float64)
    log_probs = head[:, 1] + head[:, 0] * steps
    return math.exp(-log_probs.mean()), tokens.tolist()


# llama-completion --verbose-prompt lists the prompt's tokens, one a line: "   123 -> 'piece'".
PROMPT_TOKEN = re.compile(r"^(?:\S+ I)?\s*(\d+) -> '", re.M)
PROMPT_LENGTH = re.compile(r"number of tokens in prompt = (\d+)")
NEXT_TURN = {True: "\n> ", False: "\x1e> "}  # what it prints when it waits for the next turn


def llama_answer(gguf: Path, prompt: Any, chat: bool, llama_cpp: Path) -> tuple[list[int], str]:
    """(the tokens llama.cpp feeds for the prompt, its greedy answer): a chat through the chat
    template embedded in the file (--jinja), a text as it is. Interactive, so that it waits for the
    next turn, its output whole, until its stdin closes."""
    args = [
        "-m",
        str(gguf),
        "-n",
        str(ANSWER_TOKENS),
        "--temp",
        "0",
        "--seed",
        "0",
        "--verbose-prompt",
        "--no-display-prompt",
        "--no-warmup",
    ]
    if chat:
        system = [m["content"] for m in prompt if m["role"] == "system"]
        args += ["-cnv", "--jinja", "-p", prompt[-1]["content"], *(["-sys", system[0]] if system else [])]
    else:
        args += ["-no-cnv", "-i", "--in-prefix", NEXT_TURN[False], "-p", prompt]
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            [str(llama_cpp / "llama-completion"), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
        out = until_next_turn(child, NEXT_TURN[chat])
        log.seek(0)
        listing = log.read().decode(errors="replace")
    length = PROMPT_LENGTH.search(listing)
    if NEXT_TURN[chat] not in out or length is None:
        raise ToolFailed("llama-completion", child.returncode, listing + out)
    tokens = PROMPT_TOKEN.findall(listing, length.end())[: int(length.group(1))]
    return [int(t) for t in tokens], out.rsplit(NEXT_TURN[chat], 1)[0].strip()


def until_next_turn(child: subprocess.Popen, marker: str) -> str:
    """Its stdout up to the marker it prints when it waits for the next turn (or to its end); then
    its stdin is closed, and it ends."""
    out, deadline = b"", time.monotonic() + TOOL_TIMEOUT_S
    assert child.stdout is not None and child.stdin is not None
    while not out.endswith(marker.encode()) and time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], 1.0)
        chunk = os.read(child.stdout.fileno(), 65536) if ready else b""
        if ready and not chunk:
            break  # it ended
        out += chunk
    child.stdin.close()
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    child.stdout.close()
    return out.decode(errors="replace")


def check_gguf(path: Path, quant: str, m: Material, llama_cpp: Path, scratch: Path) -> dict[str, Any]:
    try:
        ppl, tokens = llama_perplexity(path, m, llama_cpp, scratch)
        spoken = [llama_answer(path, p, m.chat, llama_cpp) for p in m.prompts]
    except ToolFailed as failed:
        return {"quantization": quant, "ok": False, "error": str(failed)}
    figures = verdict(quant, m, ppl, [i for i, _ in spoken], [t for _, t in spoken], "llama.cpp")
    return {"quantization": quant, **figures, "text_tokens_as_trained": tokens == m.ids[: len(tokens)]}


class ToolFailed(Exception):
    def __init__(self, name: str, status: int | None, output: str) -> None:
        lines = [line for line in output.splitlines() if line.strip()]
        super().__init__(f"{name} failed (exit {status}): {lines[-1] if lines else 'no output'}")


# ---- the verdict


def verdict(target: str, m: Material, ppl: float, rendered: list[list[int]], answers: list[str], how: str):
    tolerance = exports.CHECK_TOLERANCE[target]
    ratio = ppl / m.perplexity
    same = [ids == want for ids, want in zip(rendered, m.prompt_ids, strict=True)]
    return {
        "ok": math.isfinite(ratio) and abs(ratio - 1) <= tolerance and all(same),
        "scored_by": how,
        "rows": m.rows,
        "rows_from": m.origin,
        "tokens_scored": m.chunks * (m.n_ctx - m.n_ctx // 2 - 1),
        "n_ctx": m.n_ctx,
        "perplexity": round(ppl, 4) if math.isfinite(ppl) else None,
        "trained_perplexity": round(m.perplexity, 4),
        "ratio": round(ratio, 4) if math.isfinite(ratio) else None,
        "tolerance": tolerance,
        "prompts_rendered_as_trained": f"{sum(same)}/{len(same)}",
        "answers_as_trained": f"{sum(a == t for a, t in zip(answers, m.answers, strict=True))}/{len(answers)}",
        "prompts": [
            {"prompt": p if not m.chat else p[-1]["content"], "same_tokens": s, "answer": a, "trained_answer": t}
            for p, s, a, t in zip(m.prompts, same, answers, m.answers, strict=True)
        ],
    }


def check_exports(run: Run, records: list[dict[str, Any]], llama_cpp: Path) -> None:
    """Add a `check` object to each merged_16bit and GGUF record (the adapter is the trained model)."""
    checked = [r for r in records if r["kind"] != "adapter"]
    if not checked:
        return
    if run.vision:
        for record in checked:  # only merged_16bit: GGUF of a vision model is refused before it starts
            record["check"] = {"skipped": "an image-text model's export is not checked yet"}
        return
    started = time.time()
    m = trained(run)
    with tempfile.TemporaryDirectory(dir=run.folder, prefix=".check-") as scratch:
        for record in checked:
            path = Path(record["path"])
            if record["kind"] == "merged_16bit":
                record["check"] = check_merged(path, m, run.trust_remote_code)
            else:
                record["check"] = check_gguf(path, quant_of(path, run), m, llama_cpp, Path(scratch))
            record["check"]["seconds"] = round(time.time() - started, 2)  # the trained model's figures in the first
            started = time.time()


def quant_of(path: Path, run: Run) -> str:
    return path.stem.removeprefix(f"{run.recipe.name}-")


def number(value: float | None) -> str:
    return "infinite" if value is None else f"{value:g}"


def failure_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per target that failed its check, naming it and its figures."""
    lines = []
    for record in records:
        check = record.get("check") or {}
        if check.get("ok", True):
            continue
        name = f"{record['kind']} {Path(record['path']).name}"
        if "error" in check:
            lines.append(f"export check failed: {name}: {check['error']}")
            continue
        lines.append(
            f"export check failed: {name}: perplexity {number(check['perplexity'])} vs the trained model's "
            f"{number(check['trained_perplexity'])} on {check['rows']} held-out rows (ratio {number(check['ratio'])}, "
            f"tolerance ±{check['tolerance']:g}); prompts rendered as in training: "
            f"{check['prompts_rendered_as_trained']}"
        )
    return lines
