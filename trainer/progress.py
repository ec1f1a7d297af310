"""What a run measures about itself: loss history, step times, tokens, peak memory.

One TrainerCallback used by the training program and, unchanged, by the benchmark's bare
Unsloth and plain transformers scripts, so every stack is measured the same way.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

WARMUP_STEPS = 5  # the first steps compile kernels and warm caches; steady numbers skip them


def peak_memory_gib() -> dict[str, float]:
    if torch.cuda.is_available():
        return {
            f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 1024**3, 3)
            for i in range(torch.cuda.device_count())
        }
    return {"cpu": peak_host_memory_gib()}


def peak_host_memory_gib() -> float:
    """The host memory this process has peaked at so far (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


class CountingCollator:
    """Wraps a trainer's data collator and counts the tokens of each batch on the CPU.

    transformers' include_num_input_tokens_seen does the same count on the GPU with a sync
    (`.item()`) every step, which stalls a fast Unsloth step; counting the padded batch here,
    before it reaches the GPU, costs nothing. The DataLoader fetches one batch ahead, which
    cancels out of any throughput window. DPO batches carry prompt/chosen/rejected ids.
    """

    def __init__(self, collator) -> None:
        self.collator = collator
        self.tokens = 0  # every position of the batches, padding included
        self.real_tokens = 0  # the positions that hold a token of a row: without padding

    def __call__(self, features):
        batch = self.collator(features)
        # A mapping (a dict, or a processor's BatchFeature); GRPO's batches are the raw rows: its
        # trainer tokenizes as it generates.
        if isinstance(batch, Mapping):
            ids = [v for k, v in batch.items() if k.endswith("input_ids") and hasattr(v, "numel")]
            self.tokens += sum(int(v.numel()) for v in ids)
            # A padded batch marks its rows' tokens in attention_mask; a padding-free or packed one has no
            # padding (it carries position_ids instead).
            mask = batch.get("attention_mask")
            self.real_tokens += int(mask.sum()) if hasattr(mask, "sum") else sum(int(v.numel()) for v in ids)
        return batch


def count_tokens(trainer) -> CountingCollator:
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return counter


class Recorder(TrainerCallback):
    """Loss per logged step; wall time and tokens (this rank's x world size) after each step.

    `counter` (a CountingCollator) is attached once the trainer exists.
    """

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.rewards: list[tuple[int, float]] = []
        self.logged_tokens = 0
        self.first_step_at: float | None = None
        self.step_ends: list[tuple[float, int]] = []
        self.real_step_tokens: list[int] = []  # the tokens without padding, after each step
        self.counter: CountingCollator | None = None
        self.held: list[int] = []  # trainable elements per rank, set by the program after training

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        tokens = self.counter.tokens * self.world_size if self.counter is not None else 0
        self.step_ends.append((time.time(), tokens))
        self.real_step_tokens.append(self.counter.real_tokens * self.world_size if self.counter is not None else 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
        if logs and "eval_loss" in logs:
            self.eval_losses.append((state.global_step, float(logs["eval_loss"])))
        if logs and "reward" in logs:  # grpo: the mean reward of the step's completions
            self.rewards.append((state.global_step, float(logs["reward"])))
        if logs and "num_tokens" in logs:  # TRL's own count over every process (prompts and completions)
            self.logged_tokens = int(float(logs["num_tokens"]))

    def summary(self, started_at: float) -> dict[str, Any]:
        """Steady throughput over the steps after WARMUP_STEPS (all steps if there are few)."""
        ends = self.step_ends
        skip = WARMUP_STEPS if len(ends) > WARMUP_STEPS + 2 else 0
        origin = ends[skip - 1] if skip else (self.first_step_at or started_at, 0)
        steady = ends[skip:]
        elapsed = steady[-1][0] - origin[0] if steady else 0.0
        tokens = steady[-1][1] - origin[1] if steady else 0
        real = self.real_step_tokens[-1] - (self.real_step_tokens[skip - 1] if skip else 0) if steady else 0
        pairs = list(zip([origin, *steady[:-1]], steady, strict=True))
        times = [b[0] - a[0] for a, b in pairs]
        return {
            "steps_measured": len(steady),
            "steady_tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None,
            # The same steps' tokens without padding: what a padded batch spends on its rows.
            "steady_real_tokens_per_second": round(real / elapsed, 1) if elapsed > 0 else None,
            "step_time_s": round(statistics.median(times), 4) if times else None,
            # Each steady step on its own, so a benchmark can give the spread, not just the mean.
            "step_times_s": [round(t, 4) for t in times],
            "step_tokens": [b[1] - a[1] for a, b in pairs],
            "time_to_first_step_s": round(self.first_step_at - started_at, 3) if self.first_step_at else None,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "losses": self.losses,
            "eval_loss": self.eval_losses[-1][1] if self.eval_losses else None,
            "eval_losses": self.eval_losses,
            "rewards": self.rewards,
        }
