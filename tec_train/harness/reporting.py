"""What a run tells the world: the reporter hooks (rank 0) and the run dir's metrics.jsonl.

Data flow: a loop's progress and metric records --> ``Reporter`` (the CLI's rich display, or
nothing) and --> **metrics.jsonl** in the run dir, one JSON record a line, appended as the run
goes. On resume the file is cut back to the records the checkpoint has seen, so a killed and
resumed run holds exactly the records of an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tec_cache.format.fs import write_text_atomic

METRICS_NAME = "metrics.jsonl"


class Reporter:
    """Progress hooks, called on rank 0 only (a loop gives other ranks this silent base). Every hook is
    optional. Progress counts the loop's own unit: optimizer steps for ``run``, micro-batches for
    ``finetune``."""

    def start(self, *, total: int, done: int, summary: dict[str, Any]) -> None:
        """Once, before the first step: the units of the whole run, those already done, the resolved config."""

    def advance(self, done: int) -> None:
        """After every unit of progress, with the number done in all."""

    def record(self, record: dict[str, Any]) -> None:
        """With every record appended to metrics.jsonl."""

    def status(self, done: int, stats: dict[str, Any]) -> None:
        """Between records, every --log-every optimizer steps (fine-tuning, whose records come once an
        epoch): the running statistics, for a log line."""

    def message(self, text: str) -> None:
        """A one-line notice (resume, extension, ignored options)."""

    def finish(self) -> None:
        """Once, when the loop ends, normally or not."""


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record to the run dir's metrics.jsonl (call on rank 0 only)."""
    with open(Path(run_dir) / METRICS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, key: str, last: int) -> None:
    """Keep the records whose integer ``key`` is at most ``last`` (those the checkpoint has seen);
    drop later ones and the torn last line of a killed writer."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the half line of a killed writer
        if isinstance(rec, dict) and isinstance(rec.get(key), int) and rec[key] <= last:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def last_metrics_record(run_dir: Path) -> dict[str, Any] | None:
    """The newest record of the run dir's metrics.jsonl (None when there is none)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None
