"""How a failed run ends: one line on the terminal, the whole traceback in the run's log file.

Data flow: a sample that cannot be made inside a data-loader worker --> :class:`SampleError`,
naming the sample, its cause chained --> torch re-raises it in the main process with the worker's
traceback pasted into the message --> the command calls :func:`log_failure` (the full text is
appended to ``<run dir or cache>/<log name>``) and prints :func:`summary` (one line).

Used by ``tec-cache build``, ``tec-train run`` and ``tec-train finetune``; shared code, so it lives
beside the other pieces both stages import.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_LOG = "run.log"  # in a tec-train run dir (pre-training and fine-tuning)
BUILD_LOG = "build.log"  # in a tec-cache build's --out folder

# torch's ExceptionWrapper.reraise: "Caught ValueError in DataLoader worker process 2.\nOriginal Traceback ..."
_FROM_WORKER = re.compile(r"\ACaught (?P<type>\w+) in DataLoader worker process (?P<worker>\d+)\.\nOriginal ")


class SampleError(RuntimeError):
    """A sample the data loader could not make; the message is one line: which sample, then the cause."""


def one_line(exc: BaseException) -> str:
    """``Type: message`` with the message's whitespace folded, so a terminal line stays one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def naming_sample(what: str, keep: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn any failure inside the block into a :class:`SampleError` that starts with ``what``;
    exceptions of the ``keep`` types (errors that already name their file) pass unchanged."""
    passing: tuple[type[Exception], ...] = (SampleError, *keep)
    try:
        yield
    except passing:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a sample transform must say which sample
        raise SampleError(f"{what}: {one_line(e)}") from e


def from_worker(exc: BaseException) -> bool:
    """True when ``exc`` is torch re-raising a data-loader worker's exception in the main process."""
    return _FROM_WORKER.match(str(exc)) is not None


def summary(exc: BaseException) -> str:
    """One line for the terminal: what failed and, for a sample, on which sample."""
    msg = str(exc)
    m = _FROM_WORKER.match(msg)
    if m is None:
        return str(exc) if isinstance(exc, SampleError) else one_line(exc)
    # The worker's traceback ends with its exception line, "pkg.module.Type: message".
    last = next((line for line in reversed(msg.splitlines()) if line.strip()), "")
    qualname, _, text = last.partition(": ")
    where = f"data-loader worker {m['worker']}"
    if qualname.rsplit(".", 1)[-1] == SampleError.__name__:
        return f"{text} (in {where})"
    return f"{m['type']} in {where}: {' '.join(text.split())}"


def log_failure(log: Path, exc: BaseException, *, rank: int = 0) -> Path | None:
    """Append the full traceback of ``exc`` to ``log`` (folders made as needed); the path, or None
    when the log itself cannot be written (a full disk must not hide the original error)."""
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    text = "".join(traceback.format_exception(exc))
    entry = f"=== {stamp} rank {rank} pid {os.getpid()}: {' '.join(sys.argv)}\n{text}\n"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(entry)
    except OSError:
        return None
    return log


def failure_line(exc: BaseException, log: Path, *, rank: int = 0, resume: str) -> str:
    """Log ``exc`` to ``log`` and return the terminal line: the summary, where the traceback went, and
    ``resume`` (what re-running the same command does)."""
    written = log_failure(log, exc, rank=rank)
    where = f"full traceback in {written}" if written is not None else f"the traceback could not be written to {log}"
    return f"{summary(exc)}; {where}; {resume}"
