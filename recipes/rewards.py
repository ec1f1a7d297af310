"""Reward functions for GRPO (`training.method: grpo`), named in `training.grpo.rewards`.

Bundled (pure Python, this module):
  answer_tags     1.0 when the completion holds exactly one <answer>...</answer> block, else 0.0
  numeric_answer  1.0 when the number in the <answer> block (or, without one, the completion's last
                  number) equals the row's `answer` (GSM8K style: the number after "####"), else 0.0
  brevity         length shaping: 1.0 for an empty completion, falling to 0.0 at 1,000 characters

A name that is not bundled is a function of `training.grpo.reward_file`, your own Python file,
loaded by the training program only when a recipe names it: it runs your code, like
trust_remote_code. Before anything starts, `check` reads that file without running it (its
syntax, and that it defines each named function). Each function is called as TRL calls reward
functions, `f(prompts=..., completions=..., answer=..., **other_columns)`, and returns one float per
completion; the rewards are summed.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipes.errors import BadInput, closest

ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BREVITY_CHARS = 1000


def text_of(completion: Any) -> str:
    """A completion as text: TRL passes chat completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def number_in(text: str) -> float | None:
    """The answer's number: after "####" if there is one, else the last number in the text."""
    text = text.split("####")[-1]
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def answer_tags(completions: list, **_: Any) -> list[float]:
    return [1.0 if len(ANSWER_BLOCK.findall(text_of(c))) == 1 else 0.0 for c in completions]


def numeric_answer(completions: list, answer: list | None = None, **_: Any) -> list[float]:
    answers = answer if answer is not None else [None] * len(completions)
    scores = []
    for completion, expected in zip(completions, answers, strict=True):
        text = text_of(completion)
        block = ANSWER_BLOCK.findall(text)
        got = number_in(block[-1] if block else text)
        want = number_in(str(expected)) if expected is not None else None
        scores.append(1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0)
    return scores


def brevity(completions: list, **_: Any) -> list[float]:
    return [max(0.0, 1.0 - len(text_of(c)) / BREVITY_CHARS) for c in completions]


BUNDLED: dict[str, Callable[..., list[float]]] = {
    "answer_tags": answer_tags,
    "numeric_answer": numeric_answer,
    "brevity": brevity,
}


def check(names: list[str], reward_file: str | None) -> None:
    """BadInput, before anything loads, for a reward that is neither bundled nor defined in the
    reward file (which is parsed, not run)."""
    own = [name for name in names if name not in BUNDLED]
    if not own:
        return
    if reward_file is None:
        name = own[0]
        raise BadInput(
            f"training.grpo.rewards names {name!r}, which is not a bundled reward{closest(name, BUNDLED)} "
            f"(bundled: {', '.join(BUNDLED)}); use one of those, or define {name} in a file named by "
            f"training.grpo.reward_file"
        )
    path = Path(reward_file)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"training.grpo.reward_file {reward_file!r} cannot be read ({exc}); fix the path") from None
    except SyntaxError as exc:
        raise BadInput(
            f"training.grpo.reward_file {reward_file!r} is not valid Python at line {exc.lineno}: {exc.msg}; fix it"
        ) from None
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    missing = [name for name in own if name not in defined]
    if missing:
        raise BadInput(
            f"training.grpo.reward_file {reward_file!r} defines no function {missing[0]!r}"
            f"{closest(missing[0], defined)} (it defines: {', '.join(sorted(defined)) or 'none'}); define it "
            f"there at the top level, or remove it from training.grpo.rewards"
        )


def load(names: list[str], reward_file: str | None) -> list[Callable[..., list[float]]]:
    """The reward functions, in order: the training program's side (it imports your file)."""
    module = None
    if any(name not in BUNDLED for name in names):
        assert reward_file is not None  # check() ran when the recipe was loaded
        spec = importlib.util.spec_from_file_location("recipe_rewards", reward_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return [BUNDLED[name] if name in BUNDLED else getattr(module, name) for name in names]
