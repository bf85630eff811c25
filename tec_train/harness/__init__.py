"""The run harness both loops of stage 2 share: ``tec-train run`` (train.py) and ``tec-train finetune``.

Data flow: ``writer`` takes the run dir's one-writer lock (rank 0, for the whole job) --> options +
run dir --``run_dir``--> config (resume rules, extension) --``runtime``-->
device, amp, DDP, per-rank seeds --the loop--> ``state`` checkpoints (``checkpoints`` on disk,
``resume`` RNG states; each checkpoint checked against its sha256 before use) and ``reporting``
(reporter hooks, metrics.jsonl). The harness knows
nothing of objectives, data or models, and imports no command line.
"""
from __future__ import annotations

from .checkpoints import (
                          FINETUNE,
                          PRETRAIN,
                          CheckpointKind,
                          check_checkpoint,
                          latest_checkpoint,
                          list_checkpoints,
                          load_checkpoint,
                          usable_checkpoint,
)
from .errors import CheckpointError, NonFiniteLossError, ResumeError
from .reporting import METRICS_NAME, Reporter, append_metrics, truncate_metrics
from .resume import Resume, agree_on_position, find_resume
from .run_dir import RunKind, open_run_dir, run_config
from .runtime import AMP_MODES, Runtime, resolve_amp, seed_rank
from .state import RunState
from .writer import RunLock, take_run_dir

__all__ = [
    "AMP_MODES", "FINETUNE", "METRICS_NAME", "PRETRAIN", "CheckpointError", "CheckpointKind", "NonFiniteLossError",
    "Reporter", "Resume", "ResumeError", "RunKind", "RunLock", "RunState", "Runtime", "agree_on_position",
    "append_metrics", "check_checkpoint", "find_resume", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "open_run_dir", "resolve_amp", "run_config", "seed_rank", "take_run_dir", "truncate_metrics",
    "usable_checkpoint",
]
