"""bench/grpo.py's probe inside a benchmarked GRPO run: the bench puts this folder first on PYTHONPATH, so every
Python process of the run (the launcher, the training program, each rank) imports it at start-up. It does nothing
unless GRPO_PROBE_LOG names a file; then it hooks three modules as they are first imported (never importing
anything of the torch stack itself, which must load in Unsloth's order), and appends one JSON line per event:

- TRL's own timing blocks (trl.extras.profiling.ProfilingContext: `profiling_context(self, "transformers.generate")`
  around the whole generation call, Unsloth's switch to inference and back included, `_prepare_inputs`,
  `_calculate_rewards`, each reward function): name, step, seconds, per process. TRL times them with
  perf_counter and logs them only to wandb / mlflow / trackio; here they are written down.
- Completion lengths drawn from a stated distribution. A random-init model seldom samples EOS, so every completion
  would run to max_completion_length; here each completion gets a target length, uniform on
  GRPO_PROBE_LENGTHS="LOW,HIGH,SEED" (inclusive), drawn from a hash of (SEED, rank, the process's generation call,
  the completion's row in that call), the same whatever generates. A logits processor appended to the model's own
  list (GenerationMixin._get_logits_processor, which transformers' generate and its continuous batching both
  call) masks EOS before the target and leaves only EOS at it. generate() calls it with (input_ids, scores): the
  row is the batch row, the position the growth of input_ids. Continuous batching calls a processor of its own
  kind with (scores, one int32 per sequence) that it prepares from each request (prepare_tensor_args): the row is
  the request's number (req_N, numbered from 0 in each generate_batch call; the dummy requests of its warm-up are
  left alone), the position its position_offset minus its prompt; the tensor form also holds under CUDA graphs.
  The lengths drawn are written with the generation call they belong to, so the bench can check them against the
  lengths TRL logs.
- Whether continuous batching's paged KV cache was written (PagedAttentionCache.update calls, counted): an
  attention that ignores it (Unsloth's own, say) would generate without context, which no timing would show.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import threading
import time
from typing import ClassVar

LOG = os.environ.get("GRPO_PROBE_LOG")
GENERATION_BLOCKS = ("transformers.generate", "transformers.generate_batch", "vLLM.generate")
RANK = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
_state = {"call": 0, "pending": [], "paged_updates": 0}
_lock = threading.Lock()


def record(event: dict) -> None:
    line = json.dumps({**event, "rank": RANK, "pid": os.getpid(), "time": time.time()}) + "\n"
    with _lock, open(LOG, "a") as handle:  # one write per line, appended: ranks never overwrite each other
        handle.write(line)


def target_length(row: int) -> int:
    low, high, seed = (int(v) for v in os.environ["GRPO_PROBE_LENGTHS"].split(","))
    key = f"{seed}/{RANK}/{_state['call']}/{row}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return low + draw % (high - low + 1)


# ---- TRL's timing blocks


def hook_profiling(module) -> None:
    cls = module.ProfilingContext
    enter, leave = cls.__enter__, cls.__exit__

    def __enter__(self):
        if self.name.endswith(GENERATION_BLOCKS):
            with _lock:
                _state["call"] += 1
                _state["pending"] = []
        return enter(self)

    def __exit__(self, *exc):
        started = self._start_time
        result = leave(self, *exc)
        event = {"event": "timed", "name": self.name, "step": self.step, "seconds": time.perf_counter() - started}
        if self.name.endswith(GENERATION_BLOCKS):
            with _lock:
                event.update(call=_state["call"], targets=_state["pending"])
                event["paged_cache_updates"] = _state["paged_updates"]
        record(event)
        return result

    cls.__enter__, cls.__exit__ = __enter__, __exit__


# ---- forced completion lengths


def forced_length_processor():
    """One processor for both callers (see the module's docstring); built when transformers' generation is imported."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor
    from transformers.generation.logits_process import LogitsProcessor

    class ForcedLength(LogitsProcessor, ContinuousBatchingLogitsProcessor):
        supported_kwargs: ClassVar[dict] = {}  # none: it takes no per-request arguments
        ignored_kwargs: ClassVar[tuple] = ()

        def __init__(self, eos) -> None:
            self.eos = [eos] if isinstance(eos, int) else list(eos)
            self.start: int | None = None  # generate(): the prompt's length, at the first call
            self.lengths = None  # generate(): each row's length, on the scores' device
            self.targets: dict[int, int] = {}
            self.masks = None

        def target(self, row: int) -> int:
            if row not in self.targets:
                self.targets[row] = target_length(row)
                with _lock:
                    _state["pending"].append([row, self.targets[row]])
            return self.targets[row]

        def apply(self, scores, at_target):
            """EOS only where a sequence reaches its length, never before; tensors only, for CUDA graphs."""
            if self.masks is None or self.masks[0].device != scores.device:
                eos = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                eos[self.eos] = True
                only_first = torch.full((scores.shape[-1],), float("-inf"), device=scores.device)
                only_first[self.eos[0]] = 0.0
                self.masks = (eos, only_first)
            eos, only_first = self.masks
            scores = scores.masked_fill(eos, float("-inf"))
            return torch.where(at_target[:, None], only_first.to(scores.dtype), scores)

        def __call__(self, first, second):
            if first.is_floating_point():  # continuous batching: (scores, this processor's int32 per sequence)
                return self.apply(first, second[: first.shape[0]].bool())
            if self.start is None:  # generate(): (input_ids, scores); the lengths go to the GPU once a call
                self.start = first.shape[1]
                lengths = [self.target(row) for row in range(first.shape[0])]
                self.lengths = torch.tensor(lengths, device=second.device)
            return self.apply(second, self.lengths == first.shape[1] - self.start + 1)

        def fill_defaults(self, int32_tensor) -> None:
            int32_tensor.fill_(0)

        def prepare_tensor_args(self, requests_with_new_token):
            hits = []
            for request in requests_with_new_token:
                state = request.state
                numbered = re.fullmatch(r"req_(\d+)", state.request_id)
                if numbered is None:  # the dummy requests that capture CUDA graphs before generating (__warmup_...)
                    hits.append(0)
                    continue
                made = state.position_offset - len(state.initial_tokens)
                hits.append(int(made == self.target(int(numbered.group(1))) - 1))
            return torch.tensor(hits, dtype=torch.int32)

    return ForcedLength


def hook_generation(module) -> None:
    processor = forced_length_processor()
    mixin = module.GenerationMixin
    original = mixin._get_logits_processor

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        processors = original(self, generation_config, *args, **kwargs)
        eos = generation_config.eos_token_id
        if eos is None:
            eos = self.config.eos_token_id
        processors.append(processor(eos))
        return processors

    mixin._get_logits_processor = _get_logits_processor


def hook_cb_processors(module) -> None:
    """Continuous batching sizes one int32 row per processor of its kind only for those it converted itself."""
    cls = module.ContinuousBatchingLogitsProcessorList
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.tensors_required += sum(type(p).__name__ == "ForcedLength" for p in self.logits_processor)

    cls.__init__ = __init__


def hook_paged_cache(module) -> None:
    cls = module.PagedAttentionCache
    original = cls.update

    def update(self, *args, **kwargs):
        _state["paged_updates"] += 1
        return original(self, *args, **kwargs)

    cls.update = update


HOOKS = {
    "trl.extras.profiling": hook_profiling,
    "transformers.generation.utils": hook_generation,
    "transformers.generation.continuous_batching.cb_logits_processors": hook_cb_processors,
    "transformers.generation.continuous_batching.cache": hook_paged_cache,
}


# ---- running a hook once its module is imported


class AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        hook = HOOKS.get(name)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = HookedLoader(spec.loader, hook)
        return spec


class HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, hook) -> None:
        self.loader, self.hook = loader, hook

    def __getattr__(self, name):  # get_source, get_data, ... (inspect, Unsloth's source patching)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.hook(module)


def chain_other_sitecustomize() -> None:
    """Python imports one sitecustomize: run the one this folder shadows, if any (a distribution's, say)."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if LOG:
    sys.meta_path.insert(0, AfterImport())
chain_other_sitecustomize()
