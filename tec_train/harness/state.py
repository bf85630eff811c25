"""The stateful parts of a run and their checkpoint: model, optimizer, grad scaler, RNG streams.

Data flow: a loop's parts + its position (epoch, step, ...) --``RunState.save``--> every rank's RNG
states gathered --> rank 0 writes one atomic checkpoint (``checkpoints.save_checkpoint``, keeping
the newest N) --> on resume ``RunState.restore`` loads the parts and this rank's RNG states back.
The keys ("model", "optimizer", "scaler", "rng", "world_size") are those checkpoints have always
had, so a run dir written before this module existed still resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint_state import RunCheckpoint
from .checkpoints import save_checkpoint
from .resume import gather_rng, restore_rng
from .run_dir import RunKind
from .runtime import Runtime


@dataclass
class RunState:
    """What every checkpoint of a run holds besides its position."""

    model: torch.nn.Module  # the bare model, not its DDP wrapper: state-dict keys without "module."
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the run's own stream, checkpointed with the process RNGs

    def restore(self, ck: RunCheckpoint, rank: int, rng: bool = True) -> None:
        """Load a checkpoint's parts and (unless ``rng`` is false: a run resumed on another process
        count seeds its streams anew) ``rank``'s RNG states."""
        self.model.load_state_dict(ck.model, strict=True)
        self.optimizer.load_state_dict(ck.optimizer)
        if ck.scaler is not None:
            self.scaler.load_state_dict(ck.scaler)
        if rng:
            restore_rng(ck.rng[rank], self.generator)

    def save(self, runtime: Runtime, run_dir: Path, kind: RunKind, number: int, keep_last: int,
             position: dict[str, Any]) -> Path | None:
        """Checkpoint ``number`` with ``position`` (a collective; rank 0 writes and returns the path)."""
        rng = gather_rng(runtime, self.generator)
        if not runtime.is_main:
            return None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            **position,
            "rng": rng,
            "world_size": runtime.world_size,
        }
        return save_checkpoint(run_dir, state, number, keep_last, kind.checkpoints)
