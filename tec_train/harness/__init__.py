"""The run harness both loops of stage 2 share: ``tec-train run`` (train.py) and ``tec-train finetune``.

Data flow: options + run dir --``run_dir``--> config (resume rules, extension) --``runtime``-->
device, amp, DDP, per-rank seeds --the loop--> ``state`` checkpoints (``checkpoints`` on disk,
``resume`` RNG states) and ``reporting`` (reporter hooks, metrics.jsonl). The harness knows
nothing of objectives, data or models, and imports no command line.
"""
from __future__ import annotations

from .checkpoints import FINETUNE, PRETRAIN, CheckpointKind, latest_checkpoint, list_checkpoints, load_checkpoint
from .errors import CheckpointError, NonFiniteLossError, ResumeError
from .reporting import METRICS_NAME, Reporter, append_metrics, truncate_metrics
from .resume import Resume, agree_on_position, find_resume
from .run_dir import RunKind, config_for_run_dir, open_run_dir, run_config
from .runtime import AMP_MODES, Runtime, resolve_amp, seed_rank
from .state import RunState

__all__ = [
    "AMP_MODES", "FINETUNE", "METRICS_NAME", "PRETRAIN", "CheckpointError", "CheckpointKind", "NonFiniteLossError",
    "Reporter", "Resume", "ResumeError", "RunKind", "RunState", "Runtime", "agree_on_position", "append_metrics",
    "config_for_run_dir", "find_resume", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "open_run_dir",
    "resolve_amp", "run_config", "seed_rank", "truncate_metrics",
]
