"""Preemption: on SIGTERM (what Kubernetes sends, then SIGKILL after the grace period, 30 s by
default) the run saves a checkpoint at the end of the current step and stops; the next run of
the same recipe resumes from it.

Under DDP every rank must stop at the same step, or the others would wait forever in the next
gradient all-reduce. The launcher signals the whole process group, but the ranks may see the
signal at different steps, so each step starts an asynchronous all-reduce of "was I asked to
stop?" and the next step reads its result: all ranks read the same value at the same step.
The flag is a CPU tensor on a gloo group of its own, also when training runs over NCCL: read
back from the GPU, it made the host wait at every step's end until the GPU had finished all
queued work, an extra host-device sync per step that single-GPU runs do not pay.

On a GPU the handler was reset between its installation and the first step (seen on an H100:
the rank then died at once, without a checkpoint), so it is re-asserted at the start of
training and of every step; a replacement by another handler is reported once.
"""

from __future__ import annotations

import datetime
import signal
from types import FrameType

import torch
import torch.distributed as dist
from transformers import TrainerCallback

EXIT_PREEMPTED = 128 + signal.SIGTERM


class StopOnSigterm(TrainerCallback):
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.asked = False  # this rank received SIGTERM
        self.stopped_at: int | None = None  # the step whose checkpoint was saved
        self._pending = None  # (work handle, tensor) of the previous step's agreement
        self._reported = False
        self._group = None  # the gloo group the flag travels on (created by every rank at once)

    def _ask(self, signum: int, _frame: FrameType | None) -> None:
        self.asked = True

    def install(self) -> None:
        current = signal.getsignal(signal.SIGTERM)
        if current != self._ask:
            if current not in (signal.SIG_DFL, signal.SIG_IGN, None) and not self._reported:
                print(f"preemption: {current!r} had replaced the SIGTERM handler; restored", flush=True)
                self._reported = True
            signal.signal(signal.SIGTERM, self._ask)

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()
        if self.world_size > 1 and self._group is None:
            timeout = datetime.timedelta(seconds=args.ddp_timeout)
            self._group = dist.new_group(backend="gloo", timeout=timeout)

    def on_step_begin(self, args, state, control, **kwargs):
        self.install()

    def _agreed(self) -> bool:
        if self.world_size <= 1:
            return self.asked
        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # the host waits for the other ranks' hosts, never for a GPU
            decided = bool(flag.item())
        flag = torch.tensor([1 if self.asked else 0])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return decided

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:  # leave no collective in flight
            self._pending[0].wait()
            self._pending = None
