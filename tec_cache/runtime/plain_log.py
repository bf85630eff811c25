"""Output that reads well where no terminal is: a Slurm ``--output`` file, a pipe, ``nohup``.

Data flow: a command's progress (steps or views done, the latest metrics) --> a terminal keeps
rich's live bar; anything else gets :class:`PlainProgress` lines, one every N units or seconds,
each complete (never cut to a width) --> the log file. :func:`log_console` makes the command's
console: at the terminal's width on a terminal, wide enough elsewhere that tables and paths print
whole.

Shared by ``tec-cache build``, ``tec-train run`` and ``tec-train finetune``.
"""
from __future__ import annotations

import time
from typing import Any

from rich.console import Console, ConsoleDimensions

# Wide enough for any table row or path a command prints; rich then keeps every cell whole.
LOG_WIDTH = 1000


class LogConsole(Console):
    """A rich Console that, when its output is not a terminal, is :data:`LOG_WIDTH` columns wide
    instead of rich's 80, so tables and paths are never cut or ellipsised (a COLUMNS the user
    exported still sets the width, as rich reads it). Whether it is a terminal is asked at each
    use: a test runner may swap stderr after the console was made."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal and self._width is None:
            return ConsoleDimensions(LOG_WIDTH, 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]  # mypy reads Console.size as its value, not the property


def log_console(*, stderr: bool = True, **kwargs: Any) -> LogConsole:
    """The console a command prints through (soft-wrapped: an error stays one greppable line)."""
    return LogConsole(stderr=stderr, soft_wrap=True, **kwargs)


def duration(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``7s``: compact and unambiguous in a log line."""
    s = max(int(round(seconds)), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def eta(done: int, total: int | None, elapsed: float, done_at_start: int = 0) -> str:
    """Time left at the rate of this invocation (units done since it started); '?' before any."""
    ran = done - done_at_start
    if total is None or ran <= 0:
        return "?"
    return duration(elapsed / ran * max(total - done, 0))


def number(value: Any) -> str:
    """A metric value for a log line: 4 significant digits for floats, integers as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


class PlainProgress:
    """Progress as plain lines: ``line(done, fields)`` prints ``<label> <done>/<total>``, then the
    fields, elapsed time and ETA. The caller decides when (every --log-every steps, or ``due()`` for
    lines by time)."""

    def __init__(self, out: Console, label: str, every_s: float = 30.0) -> None:
        self.out = out
        self.label = label
        self.every_s = every_s
        self.total: int | None = None
        self.done_at_start = 0
        self.t0 = time.monotonic()
        self.last_line = float("-inf")

    def start(self, total: int | None, done: int = 0) -> None:
        self.total, self.done_at_start, self.t0 = total, done, time.monotonic()

    def due(self) -> bool:
        """True when ``every_s`` seconds have passed since the last line (or none was printed)."""
        return time.monotonic() - self.last_line >= self.every_s

    def line(self, done: int, fields: dict[str, Any], position: str | None = None) -> None:
        """One line: ``position`` (default ``<label> <done>/<total>``), the fields, elapsed and ETA
        (from ``done``, in the units of ``start``'s total)."""
        elapsed = time.monotonic() - self.t0
        if position is None:
            position = f"{self.label} {done}/{'?' if self.total is None else self.total}"
        parts = [position, *(f"{k} {number(v)}" for k, v in fields.items()),
                 f"elapsed {duration(elapsed)}", f"eta {eta(done, self.total, elapsed, self.done_at_start)}"]
        # print with no markup, no highlighting and no wrapping: one line, whole.
        self.out.print(" ".join(parts), markup=False, highlight=False, soft_wrap=True)
        self.last_line = time.monotonic()
