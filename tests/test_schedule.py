"""Pretraining lr rule and schedule against the reference's numbers (method.md 9.8)."""
from __future__ import annotations

import math

import pytest

from tec_train.schedule import WarmupCosine, absolute_lr


def test_reference_lr_at_reference_batch() -> None:
    assert absolute_lr(1.5e-4, 256 * 2 * 8) == pytest.approx(2.4e-3, rel=1e-12)


@pytest.mark.parametrize("epoch, expected", [(1.0, 6.0e-5), (20, 1.2e-3), (40, 2.4e-3), (170, 1.2e-3)])
def test_reference_schedule_points(epoch: float, expected: float) -> None:
    sched = WarmupCosine(lr=2.4e-3, min_lr=0.0, warmup_epochs=40, epochs=300)
    assert sched(epoch) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_schedule_shape() -> None:
    sched = WarmupCosine(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert sched(0.0) == 0.0
    assert sched(1.0) == pytest.approx(0.5)
    assert sched(10.0) == pytest.approx(0.1)
    values = [sched(2 + 8 * i / 100) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up
    assert sched(6.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_warmup_equal_to_epochs_never_divides_by_zero() -> None:
    sched = WarmupCosine(lr=1.0, min_lr=0.0, warmup_epochs=3, epochs=3)
    assert sched(1.5) == pytest.approx(0.5)
    assert sched(3.0) == 1.0
