"""One optimizer step over an accumulation window: the step ``tec-train run`` and ``finetune`` share.

Data flow: the loop's position (a fractional epoch) --schedule--> the lr of every AdamW param group
(times its ``lr_scale`` where it has one), set once per window as the reference does --> for each
micro-batch the loop hands over: its forward under autocast, its loss values over ranks checked for
non-finite ones, the scaled loss / accumulation backpropagated (under DDP's ``no_sync`` on all but
the last micro-batch, so gradients are all-reduced once per window) --> unscale and clip (optional),
GradScaler step and update, zero_grad.

The harness knows nothing of objectives, data or models: a loop describes each micro-batch by
closures (``MicroBatch``) and may do its own bookkeeping between them (the micro-batches come from
an iterator, consumed one at a time).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.nn.parallel import DistributedDataParallel

from .errors import NonFiniteLossError
from .runtime import Runtime

# (where, the micro-batch's loss values) -> the error message when they are not all finite, else None.
NonFiniteCheck = Callable[[str, dict[str, float]], str | None]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a window, as closures over inputs the loop already prepared."""

    forward: Callable[[], Any]  # under autocast: the model's output
    # The output -> (the loss to backpropagate, its named values over ranks). A collective on every
    # rank: each learns of a non-finite loss on any rank, so none hangs in the next all-reduce.
    losses: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
    where: str  # the position, in messages: "step 3 (epoch 0, micro-batch 2)"

T = TypeVar("T")


def next_micro_batch(batches: Iterator[T], wait: list[float], what: str, epoch: int, done: int, total: int) -> T:
    """The next micro-batch of a window, the time waited for it added to ``wait[0]``; RuntimeError
    naming ``what`` when the data ends before the epoch's ``total`` micro-batches (``done`` so far)."""
    tw = time.perf_counter()
    item = next(batches, None)
    wait[0] += time.perf_counter() - tw
    if item is None:
        raise RuntimeError(f"{what} ended epoch {epoch} after {done} of {total} micro-batches")
    return item


def parts_non_finite(where: str, values: dict[str, float]) -> str | None:
    """The parts name what broke (the first value is their total); an objective with one term names it."""
    named = list(values.items())
    bad = [f"{n} = {v}" for n, v in (named[1:] or named) if not math.isfinite(v)]
    return f"non-finite loss at {where}: {', '.join(bad)}" if bad else None


class AccumulatingStep:
    """The optimizer step of a run: ``step(epoch_f, micro_batches)`` takes one whole window.

    ``module`` is the bare model (its parameters are clipped), ``ddp`` its DDP wrapper when running
    distributed (gradients are synchronised on the window's last micro-batch only).
    """

    def __init__(self, *, runtime: Runtime, module: torch.nn.Module, ddp: DistributedDataParallel | None,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, schedule: Callable[[float], float],
                 accum_iter: int, clip_grad: float | None, non_finite: NonFiniteCheck = parts_non_finite) -> None:
        self.runtime, self.module, self.ddp = runtime, module, ddp
        self.optimizer, self.scaler, self.schedule = optimizer, scaler, schedule
        self.accum_iter, self.clip_grad, self.non_finite = accum_iter, clip_grad, non_finite

    def set_lr(self, epoch_f: float) -> float:
        """The schedule's lr at ``epoch_f`` into every param group (scaled by its ``lr_scale``); returns it."""
        lr = self.schedule(epoch_f)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        return lr

    def __call__(self, epoch_f: float, micro_batches: Iterable[MicroBatch]) -> tuple[float, list[dict[str, float]]]:
        """Run the window that starts at ``epoch_f`` (exactly ``accum_iter`` micro-batches) and step the
        optimizer; returns (the lr, each micro-batch's loss values). NonFiniteLossError before the
        backward of a micro-batch with a non-finite loss."""
        lr = self.set_lr(epoch_f)
        values: list[dict[str, float]] = []
        for j, micro in enumerate(micro_batches):
            last = j == self.accum_iter - 1
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not last) else contextlib.nullcontext()
            with no_sync:
                with self.runtime.autocast():
                    out = micro.forward()
                loss, named = micro.losses(out)
                problem = self.non_finite(micro.where, named)
                if problem is not None:
                    raise NonFiniteLossError(problem)
                self.scaler.scale(loss / self.accum_iter).backward()
            values.append(named)
        if len(values) != self.accum_iter:
            raise RuntimeError(f"an accumulation window of {self.accum_iter} micro-batches got {len(values)}")
        self._update()
        return lr, values

    def _update(self) -> None:
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
