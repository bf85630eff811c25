"""Data-loader worker processes that die with the process that started them, shared by both stages.

Data flow: a DataLoader of `tec-cache build`, `tec-train run` (cache, online, pixels), `finetune` or
the evaluations gets ``worker_init_fn=die_with_parent()``; each worker, once started, asks Linux to
SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG).

Why: a main process killed with SIGKILL (the OOM killer, a preempting scheduler) runs no cleanup,
so without this its workers live on, re-parented to init, each holding its memory (hundreds of MB
for a build's decode workers) until someone finds them. Other systems keep today's behaviour.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int, worker_id: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not permitted here: the worker simply keeps the default behaviour
    # The parent may have died between the fork and the prctl: then no signal will ever come.
    if os.getppid() != parent:
        os._exit(1)


def die_with_parent() -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` (picklable, so spawned workers take it too) that ties each
    worker's life to this process."""
    return functools.partial(_die_with, os.getpid())
