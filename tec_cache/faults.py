"""Fault injection for the reliability tests: kill this process at a named point.

``TEC_FAULT=point:n`` makes the n-th arrival (1-based) at ``fault_point("point")`` SIGKILL the
process, as a crash or an OOM kill would. Unset, a call costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("TEC_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
