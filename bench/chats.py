"""Chat rows as long as a real chat dataset's, built offline and reproducibly from a seed: the rows
bench/realdata.py trains on and bench/dataprep.py prepares.

The lengths follow LMSYS-Chat-1M (Zheng et al., 2023, "LMSYS-Chat-1M: A Large-Scale Real-World LLM
Conversation Dataset", arXiv:2309.11998), whose Table 1 gives per conversation 2.0 turns on average
(a turn: a user prompt and the model's response), 69.5 tokens per prompt and 214.5 per response. Only
those means are published; the spread is ours:

    exchanges per chat  1 + Geometric(p = 0.5)                       mean 2.0
    prompt tokens       LogNormal(mu = ln 69.5 - SIGMA_PROMPT**2 / 2, sigma = SIGMA_PROMPT = 1.0)   mean 69.5
    response tokens     LogNormal(mu = ln 214.5 - SIGMA_RESPONSE**2 / 2, sigma = SIGMA_RESPONSE = 0.8)  mean 214.5

so a chat holds 568 tokens on average (2.0 x (69.5 + 214.5)) with a long right tail, as real chat
sets do: most rows far shorter than a 2048-token sequence, a few longer. A turn's tokens are words
the model's tokenizer holds whole (a "Ġword" entry of its vocabulary): one token each, so a turn of
n words is n tokens, and a chat those plus its chat template's. The measured token lengths under the
model's tokenizer are what validate and plan report (entrypoint/datareport.py); the benchmarks
record them beside their results.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

EXCHANGE_P = 0.5
PROMPT_MEAN, SIGMA_PROMPT = 69.5, 1.0
RESPONSE_MEAN, SIGMA_RESPONSE = 214.5, 0.8


def lognormal_mu(mean: float, sigma: float) -> float:
    """The mu that gives a lognormal of this sigma this mean (mean = exp(mu + sigma^2 / 2))."""
    return math.log(mean) - sigma**2 / 2


DISTRIBUTION = {
    "dataset": "lmsys/lmsys-chat-1m (Zheng et al. 2023, arXiv:2309.11998, Table 1: 2.0 turns, 69.5 prompt "
    "and 214.5 response tokens per turn on average; the sigmas are assumed)",
    "exchanges": f"1 + Geometric(p={EXCHANGE_P})",
    "prompt_tokens": {"lognormal_mu": round(lognormal_mu(PROMPT_MEAN, SIGMA_PROMPT), 4), "sigma": SIGMA_PROMPT},
    "response_tokens": {"lognormal_mu": round(lognormal_mu(RESPONSE_MEAN, SIGMA_RESPONSE), 4), "sigma": SIGMA_RESPONSE},
}


def lengths(rng: random.Random) -> list[tuple[int, int]]:
    """(prompt words, response words) of each exchange of one chat."""
    exchanges = 1
    while rng.random() >= EXCHANGE_P:
        exchanges += 1
    prompt_mu, response_mu = lognormal_mu(PROMPT_MEAN, SIGMA_PROMPT), lognormal_mu(RESPONSE_MEAN, SIGMA_RESPONSE)
    return [
        (max(1, round(rng.lognormvariate(prompt_mu, SIGMA_PROMPT))),
         max(1, round(rng.lognormvariate(response_mu, SIGMA_RESPONSE))))
        for _ in range(exchanges)
    ]  # fmt: skip


def whole_words(model: Path) -> list[str]:
    """The words a model's byte-level BPE holds as one token each (with their leading space), sorted."""
    vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(token[1:] for token in vocab if token.startswith("Ġ") and token[1:].isalpha())


def chats(count: int, words: list[str], seed: int = 0, sharegpt: bool = False) -> list[dict]:
    """`count` chats of `words`: messages rows ({"messages": [{role, content}]}), or ShareGPT rows."""
    rng = random.Random(seed)
    vocab = words
    rows = []
    for _ in range(count):
        turns = []
        for prompt, response in lengths(rng):
            turns.append(("user", " ".join(rng.choices(vocab, k=prompt))))
            turns.append(("assistant", " ".join(rng.choices(vocab, k=response))))
        if sharegpt:
            names = {"user": "human", "assistant": "gpt"}
            rows.append({"conversations": [{"from": names[role], "value": text} for role, text in turns]})
        else:
            rows.append({"messages": [{"role": role, "content": text} for role, text in turns]})
    return rows
