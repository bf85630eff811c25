"""Where a run's metrics records go: metrics.jsonl, TensorBoard event files and (opt-in) W&B.

Data flow: the loop's metrics record (rank 0) --> ``MetricSinks.write`` --> **metrics.jsonl** (the
record ``tec-train plot`` reads; cut back to the checkpoint on resume by ``open_run_dir``) and every
tracker: TensorBoard events under ``<run dir>/tensorboard`` (on by default when the ``tensorboard``
package is importable) and a Weights & Biases run (``--wandb PROJECT``). Every numeric field of a
record but ``step`` and ``time`` becomes a scalar of the same name at the record's optimizer step.

Resume keeps the curves single-valued: the metrics.jsonl records after the checkpoint's step are
dropped, and a resumed TensorBoard writer opens a new event file with ``purge_step`` = that step + 1,
which TensorBoard reads as "forget every point from here on in earlier files". W&B refuses to log a
step it has seen, so it keeps the first values of re-run steps; a resume re-runs them bit for bit,
so only timing fields (images/s, data wait) can differ there.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tec_cache.format.fs import write_json_atomic

from .reporting import append_metrics

TENSORBOARD_DIR = "tensorboard"  # in the run dir
WANDB_NAME = "wandb.json"  # in the run dir: the W&B run id (and project) a resumed job continues
NOT_SCALARS = frozenset({"step", "time"})
TENSORBOARD_MISSING = ("TensorBoard is off: the tensorboard package is not installed "
                       "(pip install 'tec-pretrain[tensorboard]'); metrics.jsonl is written as always")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields as scalars (booleans, strings, lists, ``step`` and ``time`` left out)."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def check_wandb_installed(project: str | None) -> None:
    """ValueError naming --wandb when W&B logging is asked for but the package is missing (checked
    with the options, before any work)."""
    if project is None:
        return
    if not project.strip() or "/" in project:
        raise ValueError(f"--wandb: expected a W&B project name (no '/'; the entity comes from WANDB_ENTITY), got {project!r}")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--wandb {project}: the wandb package is not installed; pip install 'tec-pretrain[wandb]' "
                         "(or drop --wandb: metrics.jsonl and TensorBoard need no account)")


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _after_existing_event_files(log_dir: Path) -> None:
    """Wait, if needed, until an event file made now sorts after every existing one. TensorBoard reads
    a folder's event files in name order, and the name starts with whole seconds: a writer opened in
    the same second as the last one (a quick resume) could otherwise be read first, and its purge
    would not reach the points it is meant to drop."""
    newest = 0
    for p in log_dir.glob("events.out.tfevents.*"):
        try:
            newest = max(newest, int(p.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardTracker:
    """Scalars into ``log_dir`` with torch's SummaryWriter; flushed with every record, so the points a
    checkpoint has seen are on disk before it, whatever kills the process later."""

    def __init__(self, log_dir: Path, kept_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        resumed = any(log_dir.glob("events.out.tfevents.*"))
        if resumed:
            _after_existing_event_files(log_dir)
        # purge_step: points at this step and later in earlier files are stale (not in metrics.jsonl).
        self.writer = SummaryWriter(str(log_dir), purge_step=kept_step + 1 if resumed else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per run dir: its id is kept in ``<run dir>/wandb.json`` before the run starts, so a
    resumed or requeued job continues it (``resume="allow"``). W&B's own variables (WANDB_MODE,
    WANDB_DIR, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_TAGS, ...) apply as W&B documents them;
    without WANDB_DIR its files go to the run dir."""

    def __init__(self, project: str, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        path = run_dir / WANDB_NAME
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        # W&B's own id format: 8 characters of [a-z0-9].
        run_id = stored.get("id") or os.environ.get("WANDB_RUN_ID") or "".join(
            secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if stored.get("id") != run_id or stored.get("project") != project:
            write_json_atomic(path, {"id": run_id, "project": project})
        kwargs: dict[str, Any] = {}
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(run_dir)
        if "WANDB_NAME" not in os.environ:
            kwargs["name"] = run_dir.resolve().name
        # The config once, when the W&B run is made; a resumed one has it already.
        if not stored.get("id"):
            kwargs["config"] = config
        self.run = wandb.init(project=project, id=run_id, resume="allow", **kwargs)
        self.id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self.run.step:
            return  # logged by the launch before this resume; W&B would refuse it with a warning
        self.run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """The run's metrics record goes to metrics.jsonl and to every tracker (rank 0 only)."""

    def __init__(self, run_dir: Path, trackers: list[Tracker] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.trackers: list[Tracker] = list(trackers or [])

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (which carries an integer ``step``) everywhere."""
        append_metrics(self.run_dir, record)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_sinks(run_dir: Path, *, kept_step: int, tensorboard: bool, wandb_project: str | None,
               config: dict[str, Any], notice: Callable[[str], None]) -> MetricSinks:
    """The sinks of a run on rank 0, after ``open_run_dir`` cut metrics.jsonl back to ``kept_step``
    (the last optimizer step whose records are kept; 0 for none)."""
    trackers: list[Tracker] = []
    try:
        if tensorboard:
            if tensorboard_available():
                trackers.append(TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR, kept_step))
            else:
                notice(TENSORBOARD_MISSING)
        if wandb_project is not None:
            trackers.append(WandbTracker(wandb_project, Path(run_dir), config))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return MetricSinks(run_dir, trackers)
