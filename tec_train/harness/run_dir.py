"""The run dir's config: which options a resumed run takes, what it refuses, and config.json.

Data flow: options given on the command line + the latest checkpoint's stored options -->
``check_options`` (called by tec_train/options.py's one resolution: a changed setting is refused
naming the option; a raised --epochs becomes an ``Extension``) --> the loop's config --> ``open_run_dir``
writes **config.json** ({"options", "resolved", and "extended" once a run was extended}) and cuts
metrics.jsonl back to the checkpoint.

The same rules serve ``tec-train run`` and ``tec-train finetune``; a ``RunKind`` holds what differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tec_cache.format.fs import write_json_atomic
from tec_cache.runtime.config import flag_name

from .checkpoint_state import FinetuneCheckpoint, PretrainCheckpoint, read_state
from .checkpoints import CheckpointKind, load_checkpoint, remove_stale_temp_files
from .errors import CheckpointError, ResumeError
from .reporting import METRICS_NAME, truncate_metrics

CONFIG_NAME = "config.json"
# The one option that may grow on resume: a larger --epochs extends the run.
EXTENDABLE = "epochs"

C = TypeVar("C")


@dataclass(frozen=True)
class RunKind:
    """What differs between the run dirs of ``tec-train run`` and ``tec-train finetune``."""

    checkpoints: CheckpointKind
    label: str  # "run" | "fine-tuning run", in messages
    # Options that may differ on resume: where things are and how the run is watched, never which
    # steps it takes.
    mutable: frozenset[str]
    fresh_start: str  # how to start over instead, in messages; "{ckpt}" is the latest checkpoint
    world_size_needs: str  # what depends on the process count, in messages
    progress_key: str  # the metrics.jsonl field a checkpoint's position is counted in
    # Options that may change together with the process count, as long as the loop keeps what they
    # make together (pretraining: batch x accumulation x processes, the effective batch). Empty: the
    # run resumes only on the process count it was started with.
    elastic: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Extension:
    """A resumed run told to train for more epochs than its checkpoint was made for."""

    old: int
    new: int

    def entry(self, step: int, epoch: int) -> dict[str, int]:
        """The record config.json's "extended" list keeps of it."""
        return {"from": self.old, "to": self.new, "step": step, "epoch": epoch}

    def notice(self, step: int, epoch: int) -> str:
        return (f"extending the run from {self.old} to {self.new} epochs at step {step} (epoch {epoch}); "
                "the schedule follows the new total from here")


def check_options(stored: dict[str, Any], current: dict[str, Any], ckpt: Path, kind: RunKind) -> Extension | None:
    """Compare the options of a run dir's checkpoint with this run's; ResumeError names the first
    changed setting. A raised --epochs is allowed and returned as an Extension; a lowered one is not."""
    extension = None
    for name, value in current.items():
        if name in kind.mutable or name in kind.elastic or name not in stored or stored[name] == value:
            continue
        if name == EXTENDABLE:
            if value > stored[name]:
                extension = Extension(stored[name], value)
                continue
            raise ResumeError(
                f"{flag_name(name)}: the {kind.label} in {ckpt.parent} has {stored[name]!r} epochs, now {value!r}; "
                "a run dir can be extended (a larger --epochs) but not shortened (use a new --run-dir)"
            )
        raise ResumeError(
            f"{flag_name(name)}: the {kind.label} in {ckpt.parent} was started with {stored[name]!r}, now {value!r}; "
            f"a run dir resumes only with the same settings ({kind.fresh_start.format(ckpt=ckpt)})"
        )
    return extension


def read_checkpoint(path: Path, kind: RunKind) -> PretrainCheckpoint | FinetuneCheckpoint:
    """A run dir's checkpoint for resuming, as typed state; a damaged one, or one without a key the
    run needs, is a ResumeError naming the file (and the key)."""
    try:
        return read_state(load_checkpoint(path, kind.checkpoints), path)
    except CheckpointError as e:
        raise ResumeError(str(e)) from e


def run_config(options: dict[str, Any], resolved: dict[str, Any], extended: list[dict[str, int]]) -> dict[str, Any]:
    """What config.json and every checkpoint's "config" hold; "extended" only once the run was extended."""
    config: dict[str, Any] = {"options": options, "resolved": resolved}
    if extended:
        config["extended"] = list(extended)
    return config


def open_run_dir(run_dir: Path, kind: RunKind, last_done: int, config: dict[str, Any]) -> None:
    """Make the run dir ready on rank 0: drop what killed writers left, cut metrics.jsonl back to the
    records up to ``last_done`` (the checkpoint's position in ``kind.progress_key``), write config.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(run_dir, kind.checkpoints)
    truncate_metrics(run_dir / METRICS_NAME, kind.progress_key, last_done)
    write_json_atomic(run_dir / CONFIG_NAME, config)
