"""Fault injection for the reliability tests: fail this process at a named point.

``TEC_FAULT=POINT:N[@RANK][/ACTION]`` makes the N-th arrival (1-based, default 1) of this process
at ``fault_point("POINT")`` fail:

* ``/kill`` (the default) SIGKILLs the process, as a crash, an OOM kill or a lost node would;
* ``/enospc`` raises ``OSError(ENOSPC)`` there, as a write to a full disk would;
* ``/raise`` raises ``InjectedFault`` there, as a bug or a bad sample inside a data-loader worker would.

``@RANK`` limits the fault to the process whose torchrun ``RANK`` is RANK, so a test can lose one
rank of a job. ``TEC_FAULT_LOG=PATH`` appends the name of every arrival to PATH, one per line, so a
test can count a run's arrivals and draw, from a seeded RNG, an N that the run reaches.

Unset, a call costs two dict lookups. Points are placed where a crash leaves a distinct state on
disk (a temporary half written, complete but unrenamed, renamed but unrecorded, ...).
"""
from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass
from functools import lru_cache

ACTIONS = ("kill", "enospc", "raise")

_counts: dict[str, int] = {}
_lock = threading.Lock()  # the build's writer thread reaches points too


class InjectedFault(RuntimeError):
    """The exception of a ``/raise`` fault."""


@dataclass(frozen=True)
class FaultSpec:
    point: str
    nth: int
    rank: int | None
    action: str


@lru_cache(maxsize=8)
def parse_fault(spec: str) -> FaultSpec:
    """``POINT:N[@RANK][/ACTION]`` -> FaultSpec; ValueError names what is wrong."""
    body, _, action = spec.partition("/")
    body, _, rank = body.partition("@")
    point, _, nth = body.partition(":")
    action = action or "kill"
    if not point or action not in ACTIONS or not (nth or "1").isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"TEC_FAULT={spec!r}: expected POINT:N[@RANK][/ACTION], ACTION one of {ACTIONS}")
    return FaultSpec(point, int(nth or 1), int(rank) if rank else None, action)


def reset_faults() -> None:
    """Forget arrival counts (tests that run several faulty builds in one process)."""
    with _lock:
        _counts.clear()


def fault_point(name: str) -> None:
    log = os.environ.get("TEC_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    spec = os.environ.get("TEC_FAULT")
    if not spec:
        return
    fault = parse_fault(spec)
    if fault.point != name or (fault.rank is not None and fault.rank != int(os.environ.get("RANK", 0))):
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == fault.nth
    if not hit:
        return
    if fault.action == "enospc":
        # No filename, as a real write(2) failure reports it: naming the path is the caller's job.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {name} (arrival {fault.nth})")
    os.kill(os.getpid(), signal.SIGKILL)
