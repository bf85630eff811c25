"""Learning-rate rule and schedule of TEC pretraining (method.md 4).

Data flow: loader position (epoch, micro-batch) --> fractional epoch --> **lr** --> every AdamW
param group, set at the start of each accumulation window as the reference does. The absolute lr
comes from the base lr scaled by the effective batch (batch x accum x world size) / 256.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


def absolute_lr(blr: float, eff_batch: int) -> float:
    """The reference's linear scaling rule: lr = blr * eff_batch / 256."""
    return blr * eff_batch / 256


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then a half-cosine down to ``min_lr`` at ``epochs``.

    Called with a fractional epoch (epoch + micro-batch / micro-batches per epoch), so the lr
    changes every iteration, not every epoch.
    """

    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        decay = self.epochs - self.warmup_epochs
        if decay <= 0:  # all warm-up: no cosine phase left
            return self.lr
        progress = min((epoch - self.warmup_epochs) / decay, 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ScheduleOptions(Protocol):
    """The options a schedule is built from (``tec-train run`` and ``finetune`` both have them)."""

    @property
    def lr(self) -> float | None: ...
    @property
    def blr(self) -> float: ...
    @property
    def min_lr(self) -> float: ...
    @property
    def warmup_epochs(self) -> float: ...
    @property
    def epochs(self) -> int: ...


def build_schedule(optim: ScheduleOptions, eff_batch: int) -> WarmupCosine:
    """The run's schedule: peak lr ``--lr``, else ``--blr`` scaled by the effective batch; warm-up
    clipped to ``--epochs``. An extended run builds the one of its new total: the lr follows it from
    the resumed position on."""
    peak = optim.lr if optim.lr is not None else absolute_lr(optim.blr, eff_batch)
    return WarmupCosine(peak, optim.min_lr, min(optim.warmup_epochs, optim.epochs), optim.epochs)
