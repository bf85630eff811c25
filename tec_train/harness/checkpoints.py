"""Checkpoint files of a run dir: atomic writes, keep-last-N, discovery of the latest complete one.

Data flow: a loop's state (model, optimizer, scaler, position, RNG states, resolved config; see
``state``) --> **checkpoint-<global step>.pt** (pretraining) or **finetune-<epoch>.pt** in the run
dir --> resume (same run dir), export or the downstream encoder reader.

A checkpoint is written to a hidden temporary sibling, flushed and fsynced, then renamed over its
final name, and the folder is fsynced; only files with the final name pattern are ever read. So
a process killed at any point leaves either the previous checkpoints untouched or the new one
complete. Everything stored is a tensor, a number, a string, or a list/dict of them, so
``torch.load(weights_only=True)`` reads it: no pickled objects.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tec_cache.faults import fault_point
from tec_cache.format.fs import write_atomic

from .errors import CheckpointError

CHECKPOINT_FORMAT = "tec-train-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointKind:
    """A family of checkpoints in a run dir: ``{prefix}-{n:0{digits}d}.pt`` with a format tag and version."""

    prefix: str
    digits: int
    format: str
    version: int
    label: str  # for messages: "a tec-train checkpoint"

    @property
    def name_re(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}-(\d{{{self.digits},}})\.pt$")

    @property
    def temp_prefix(self) -> str:
        return f".{self.prefix}-"

    def path(self, run_dir: Path, n: int) -> Path:
        return Path(run_dir) / f"{self.prefix}-{n:0{self.digits}d}.pt"


PRETRAIN = CheckpointKind("checkpoint", 8, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "tec-train")  # numbered by global step
FINETUNE = CheckpointKind("finetune", 4, "tec-train-finetune", 1, "fine-tuning")  # numbered by epochs done


def checkpoint_path(run_dir: Path, global_step: int) -> Path:
    return PRETRAIN.path(run_dir, global_step)


def list_checkpoints(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run dir as (number, path), oldest first; temp files are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    name_re = kind.name_re
    found = []
    for p in run_dir.iterdir():
        m = name_re.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> Path | None:
    ckpts = list_checkpoints(run_dir, kind)
    return ckpts[-1][1] if ckpts else None


def remove_stale_temp_files(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> list[Path]:
    """Delete temporaries left by writers that were killed; call only while no writer runs."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.glob(f"{kind.temp_prefix}*") if p.is_file()] if run_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(run_dir: Path, state: dict[str, Any], n: int, keep_last: int, kind: CheckpointKind = PRETRAIN) -> Path:
    """Write ``state`` atomically as ``kind``'s checkpoint number ``n``, then keep only the newest ``keep_last``."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = kind.path(run_dir, n)
    tmp = run_dir / f"{kind.temp_prefix}{n:0{kind.digits}d}.pt.tmp-{os.getpid()}"
    payload = {"format": kind.format, "version": kind.version, **state}
    # Under fault injection only, the writes pass through a wrapper that can stop the process with
    # half a zip on disk; otherwise torch.save writes straight to the file. A kill at mid_checkpoint
    # leaves a complete but unnamed temp file: the previous checkpoint stays latest; at
    # after_checkpoint_rename the new checkpoint is complete and older ones not yet pruned.
    torn = bool(os.environ.get("TEC_FAULT") or os.environ.get("TEC_FAULT_LOG"))
    write_atomic(final, lambda f: torch.save(payload, _TornWriter(f) if torn else f), tmp=tmp,
                 before_rename="mid_checkpoint", after_rename="after_checkpoint_rename")
    for _, old in list_checkpoints(run_dir, kind)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


class _TornWriter:
    """File wrapper for torch.save that reaches fault point ``checkpoint_torn`` once the first write
    is flushed: a kill there leaves a truncated zip under the temporary name."""

    def __init__(self, f: Any) -> None:
        self.f, self.writes = f, 0

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.writes += 1
        if self.writes == 1:
            self.f.flush()
            fault_point("checkpoint_torn")
        return n

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: Path, kind: CheckpointKind = PRETRAIN) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only, on the CPU)."""
    path = Path(path)
    try:
        # mmap: reading the config or the RNG states does not page in the weights.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"{path}: not a readable {kind.label} checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != kind.format:
        raise CheckpointError(f"{path}: not a {kind.label} checkpoint (no format {kind.format!r})")
    if obj.get("version") != kind.version:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} is not supported (this tool reads {kind.version})")
    return obj
