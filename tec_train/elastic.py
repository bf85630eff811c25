"""Resuming a pretraining run on another number of processes (a requeue onto fewer or more nodes).

Data flow: the checkpoint's layout (processes x micro-batch x accumulation) and position (epoch,
micro-batch) + this launch's process count and options --> ``fit_layout`` (the accumulation that
keeps the effective batch, or a ResumeError that says which batch and accumulation do) -->
``micro_batch_after`` (the same global sample position in the new layout) --> the loop.

Why a position carries over: both sources that a run resumes elastically (the cache loader and the
online image loader) hand micro-step i of an epoch the global samples [i*W*B, (i+1)*W*B) of the
epoch's order, whatever the process count W, and a checkpoint is only ever taken between optimizer
steps, that is after g whole effective batches. The epoch's first g*E samples are done in any layout
with effective batch E, and the epoch ends after floor(N / E) optimizer steps in every layout, so
no sample of the epoch is skipped or seen twice. Which rank sees which of the remaining samples,
and their masks, depend on the layout; the masks are drawn per (seed, step, rank, micro-batch), so
they are defined for any process count.
"""
from __future__ import annotations

from dataclasses import dataclass

from .harness.errors import ResumeError

_MAX_SUGGESTIONS = 4


@dataclass(frozen=True)
class Layout:
    """How an optimizer step's effective batch is split: processes x micro-batch x accumulation."""

    world_size: int
    batch_size: int
    accum_iter: int

    @property
    def eff_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum_iter

    @property
    def per_micro_step(self) -> int:
        """Global samples one micro-step takes, over all processes."""
        return self.world_size * self.batch_size

    def describe(self) -> str:
        return (f"{self.world_size} process(es) x batch {self.batch_size} x accumulation {self.accum_iter} "
                f"= {self.eff_batch}")


def fit_layout(saved: Layout, now: Layout, where: str) -> Layout:
    """The layout to resume ``saved`` (the checkpoint's) with on ``now.world_size`` processes.

    The effective batch sets the learning rate, the steps per epoch and the samples each step
    averages, so it must stay. When the launch keeps the saved micro-batch and accumulation (only the
    process count changed), the accumulation is recomputed to keep it; given a micro-batch and
    accumulation that do not keep it, or a process count nothing fits, ResumeError says what would.
    """
    if now.eff_batch == saved.eff_batch:
        return now
    eff = saved.eff_batch
    if (now.batch_size, now.accum_iter) == (saved.batch_size, saved.accum_iter) and eff % now.per_micro_step == 0:
        return Layout(now.world_size, now.batch_size, eff // now.per_micro_step)
    fits = [(b, eff // (now.world_size * b)) for b in range(max(saved.batch_size, now.batch_size), 0, -1)
            if eff % (now.world_size * b) == 0]
    head = f"effective batch: the run in {where} was started with {saved.describe()}; this launch has {now.describe()}"
    if not fits:
        raise ResumeError(f"{head}, and no micro-batch and accumulation make {eff} on {now.world_size} process(es) "
                          f"({eff} is not a multiple of {now.world_size}); resume on a process count that divides {eff}")
    listed = ", ".join(f"--batch-size {b} --accum-iter {a}" for b, a in fits[:_MAX_SUGGESTIONS])
    raise ResumeError(f"{head}; the effective batch must stay {eff}: resume with {listed}")


def micro_batch_after(saved: Layout, micro_batch: int, now: Layout) -> int:
    """The micro-batch of ``now`` at the global sample position of ``saved``'s ``micro_batch``."""
    done = micro_batch * saved.per_micro_step  # samples of the epoch already trained on
    if done % now.per_micro_step or done % now.eff_batch:
        # A checkpoint sits after whole optimizer steps and fit_layout kept the effective batch,
        # so this is a damaged or foreign checkpoint rather than a layout to fit.
        raise ResumeError(f"the checkpoint's position ({micro_batch} micro-batches of {saved.per_micro_step} samples) "
                          f"is not a whole number of optimizer steps of {now.eff_batch} samples")
    return done // now.per_micro_step
