"""The options of ``tec-train run`` as one dataclass, and their checks.

Data flow: command-line flags (+ a pipeline's [pretrain] or [base] table, + the run dir's stored
options on resume) --> **TrainConfig** --> ``validate`` (no model, no data read) --> train.Trainer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tec_cache.basemodels import REGISTRY

from .harness.run_dir import option_name
from .harness.runtime import AMP_MODES
from .objectives import OBJECTIVES
from .student import parse_model_name

VIEW_ORDERS = ("cycle", "permute")


@dataclass
class TrainConfig:
    """Every option of ``tec-train run``; field ``foo_bar`` is the option ``--foo-bar``."""

    run_dir: str
    # tec: predict a base model's targets (from --cache or online); mae: plain MAE on --data pixels.
    objective: str = "tec"
    cache: str | None = None
    # Online mode (the base model runs inside the step), options as in tec-cache build.
    online_basemodel: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    arch: str | None = None
    topk: int | None = None
    tau: float | None = None
    last_layers: int | None = None
    base_depth: int | None = None
    # Student.
    model: str = "vit_base_patch16"
    depth: int | None = None
    img_size: int | None = None
    patch_size: int | None = None
    mask_ratio: float = 0.75
    init_from: str | None = None
    # Optimisation (spec 4).
    epochs: int = 300
    warmup_epochs: float = 40.0
    batch_size: int = 256
    accum_iter: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float | None = None
    seed: int = 0
    # Loader.
    num_workers: int = 4
    view_order: str = "cycle"
    # Run control.
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 20
    max_steps: int | None = None
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def online(self) -> bool:
        return self.online_basemodel is not None or self.arch is not None

    def validate(self, external_source: bool = False) -> None:
        """Option checks that need no model and no data; ValueError names the option."""
        positive = ("epochs", "batch_size", "accum_iter", "ckpt_every", "keep_last", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option_name(name)}: must be a positive integer, got {value!r}")
        for name in ("depth", "img_size", "patch_size", "max_steps", "topk", "last_layers", "base_depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{option_name(name)}: must be a positive integer, got {value!r}")
        for name in ("blr", "lr", "clip_grad", "tau"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{option_name(name)}: must be a positive number, got {value!r}")
        for name in ("warmup_epochs", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{option_name(name)}: must be a number >= 0, got {value!r}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio: must be in [0, 1), got {self.mask_ratio!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers: must be >= 0, got {self.num_workers!r}")
        if self.seed < 0:
            raise ValueError(f"--seed: must be an integer >= 0, got {self.seed!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.view_order not in VIEW_ORDERS:
            raise ValueError(f"--view-order: expected one of {', '.join(VIEW_ORDERS)}, got {self.view_order!r}")
        try:
            parse_model_name(self.model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise ValueError(f"--init-from: no such file {self.init_from}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"--run-dir: {self.run_dir} exists and is not a folder")
        self._validate_mode(external_source)

    def _validate_mode(self, external_source: bool) -> None:
        online_only = [n for n in ("checkpoint", "data", "topk", "tau", "last_layers", "base_depth") if getattr(self, n) is not None]
        if self.objective == "mae" and not external_source:
            targets = [n for n in ("cache", "online_basemodel", "arch", "checkpoint", "topk", "tau", "last_layers", "base_depth")
                       if getattr(self, n) is not None]
            if targets:
                raise ValueError(f"{option_name(targets[0])}: --objective mae learns from pixels; it takes --data only, no base model or cache")
            if self.data is None or not Path(self.data).exists():
                raise ValueError(f"--data: --objective mae needs an image folder or .tar shards, got {self.data!r}")
            return
        if external_source:
            if self.cache is not None or self.online or online_only:
                raise ValueError("a target feed was passed in: --cache and the online options must not be set")
            return
        if self.cache is not None and self.online:
            raise ValueError("--cache and --online-basemodel/--arch exclude each other: train from a cache or online")
        if self.cache is None and not self.online:
            raise ValueError("one of --cache CACHE or --online-basemodel NAME (or --arch TIMM_NAME) is required")
        if self.cache is not None:
            if online_only:
                raise ValueError(f"{option_name(online_only[0])}: only for online mode (--online-basemodel), not with --cache")
            if not Path(self.cache).is_dir():
                raise ValueError(f"--cache: no such cache folder {self.cache}")
            return
        if self.online_basemodel is not None and self.online_basemodel not in REGISTRY:
            raise ValueError(f"--online-basemodel: unknown base model {self.online_basemodel!r}; expected one of {sorted(REGISTRY)}")
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            raise ValueError(f"--checkpoint: online mode needs the base model's weights file, got {self.checkpoint!r}")
        if self.data is None or not Path(self.data).exists():
            raise ValueError(f"--data: online mode needs an image folder or .tar shards, got {self.data!r}")


# Options that may differ when a run dir is resumed: they change where things are or how the run
# is watched, never which steps it takes. The paths are free because a cache or dataset may move;
# what they hold is compared through the resolved target spec instead. --epochs may grow (the run
# is extended; harness.run_dir), never shrink.
MUTABLE_ON_RESUME = frozenset({
    "run_dir", "cache", "checkpoint", "data", "init_from", "num_workers", "ckpt_every", "keep_last",
    "log_every", "max_steps", "device", "compile",
})
