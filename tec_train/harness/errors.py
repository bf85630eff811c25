"""The errors of a run (``tec-train run`` and ``tec-train finetune``), in one place.

Data flow: raised by the run harness and the two loops --> the CLI, which exits 2 for a ValueError
raised before the first step (bad option, a run dir that cannot be resumed, a damaged checkpoint)
and 1 for a failure during the run (a non-finite loss).
"""
from __future__ import annotations


class ResumeError(ValueError):
    """The run dir's checkpoint was made by a run this configuration cannot continue."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step and the term."""


class CheckpointError(ValueError):
    """A file is not a readable tec-train checkpoint."""
