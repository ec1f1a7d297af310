"""No process of a run outlives what started it: each asks the kernel for SIGTERM when its parent
dies (Linux's parent-death signal), however the parent dies, SIGKILL included. The launcher asks it
for its child (accelerate launch, or the training program), and each training process for itself,
since torchrun's agent starts the ranks. SIGTERM, not SIGKILL: a rank that gets it saves the step's
checkpoint and stops (trainer/preemption.py), as on a preemption.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded at import: a forked child must not load libraries


def die_with_parent() -> None:
    """For this process (in a child between fork and exec: only a system call)."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def follow_parent() -> None:
    """For this process, once it runs. Had the parent died before the request took effect, the
    signal would never come: end now, as it would have."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
