"""The options of ``tec-train finetune`` as one dataclass, and their checks.

Data flow: command-line flags (+ a pipeline's [finetune] table, + the run dir's stored options on
resume) --> **FinetuneConfig** --> ``validate`` (no model, no data read) --> finetune.Finetuner.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tec_cache import fashion_mnist
from tec_cache.basemodels import REGISTRY

from .augment import NO_AUGMENT, finetune_train_transform
from .harness.run_dir import option_name
from .harness.runtime import AMP_MODES
from .student import parse_model_name

MIXUP_MODES = ("batch", "pair", "elem")


@dataclass
class FinetuneConfig:
    """Every option of ``tec-train finetune``; field ``foo_bar`` is the option ``--foo-bar``.

    Defaults are the reference recipe (spec 6, README ViT-B row).
    """

    run_dir: str
    source: str | None = None  # export folder, run dir, checkpoint-*.pt, reference checkpoint or base weights
    # Data: exactly one.
    data: str | None = None
    fashion_mnist: str | None = None
    # Encoder source details (see encoder_weights.read_encoder_weights).
    model: str | None = None
    basemodel: str | None = None
    arch: str | None = None
    checkpoint: str | None = None  # base-model weights, as --checkpoint of tec-cache build (instead of SOURCE)
    mlp_token: bool = True  # keep and train a TEC source's cls MLP, as the README runs; False folds it
    # Model.
    global_pool: bool = True  # mean of patch tokens -> fc_norm -> head; False: norm -> cls token -> head
    img_size: int | None = None  # default: the encoder's; pos_embed is re-sampled when it differs
    drop_path: float = 0.1
    # Optimisation.
    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 128
    accum_iter: int = 1
    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    clip_grad: float | None = None
    # Augmentation and loss.
    aa: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    crop_pct: float | None = None  # eval crop; default 0.875 for --data, 1.0 for --fashion-mnist
    # Data subsets for quick runs.
    train_subset: int | None = None
    val_subset: int | None = None
    # Run control.
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"
    amp: str = "auto"
    keep_last: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> None:
        """Option checks that need no model and no data loading; ValueError names the option."""
        for name in ("epochs", "batch_size", "accum_iter", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option_name(name)}: must be a positive integer, got {value!r}")
        for name in ("img_size", "train_subset", "val_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{option_name(name)}: must be a positive integer, got {value!r}")
        for name in ("blr", "lr", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{option_name(name)}: must be a positive number, got {value!r}")
        for name in ("warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{option_name(name)}: must be a number >= 0, got {value!r}")
        for name, lo, hi, closed in (("layer_decay", 0.0, 1.0, True), ("drop_path", 0.0, 1.0, False),
                                     ("smoothing", 0.0, 1.0, False), ("reprob", 0.0, 1.0, True),
                                     ("mixup_prob", 0.0, 1.0, True), ("mixup_switch_prob", 0.0, 1.0, True)):
            value = getattr(self, name)
            ok = (lo < value <= hi) if name == "layer_decay" else (lo <= value <= hi if closed else lo <= value < hi)
            if not ok:
                rng = "(0, 1]" if name == "layer_decay" else ("[0, 1]" if closed else "[0, 1)")
                raise ValueError(f"{option_name(name)}: must be in {rng}, got {value!r}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop-pct: must be in (0, 1], got {self.crop_pct!r}")
        if self.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"--mixup-mode: expected one of {', '.join(MIXUP_MODES)}, got {self.mixup_mode!r}")
        if self.mixup_active and self.batch_size % 2:
            raise ValueError(f"--batch-size: Mixup/CutMix needs an even batch size, got {self.batch_size} "
                             "(or set --mixup 0 --cutmix 0)")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers: must be >= 0, got {self.num_workers!r}")
        if self.seed < 0:
            raise ValueError(f"--seed: must be an integer >= 0, got {self.seed!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"--amp: expected one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.aa.lower() not in NO_AUGMENT:
            try:
                finetune_train_transform(32, aa=self.aa, reprob=0.0)
            except Exception as e:  # noqa: BLE001 - timm's parser raises several kinds
                raise ValueError(f"--aa: {self.aa!r} is not a timm auto-augment string "
                                 f"(e.g. rand-m9-mstd0.5-inc1, or none): {e}") from None
        if self.model is not None:
            try:
                parse_model_name(self.model)
            except ValueError as e:
                raise ValueError(f"--model: {e}") from None
        if self.basemodel is not None and self.basemodel not in REGISTRY:
            raise ValueError(f"--basemodel: unknown base model {self.basemodel!r}; expected one of {sorted(REGISTRY)}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"--run-dir: {self.run_dir} exists and is not a folder")
        self._validate_sources()

    def _validate_sources(self) -> None:
        base = self.basemodel is not None or self.arch is not None
        if self.checkpoint is not None:
            if not base:
                raise ValueError("--checkpoint: base-model weights need --basemodel NAME or --arch TIMM_NAME")
            if self.source is not None:
                raise ValueError(f"--checkpoint: give the base-model weights once, as SOURCE or --checkpoint "
                                 f"(got both {self.source} and {self.checkpoint})")
        weights = self.encoder_path
        if weights is None:
            raise ValueError("SOURCE: an export folder, run dir, checkpoint file, or base-model weights is required")
        if not Path(weights).exists():
            raise ValueError(f"{'--checkpoint' if self.checkpoint else 'SOURCE'}: no such file or folder {weights}")
        if base and not Path(weights).is_file():
            raise ValueError(f"{'--checkpoint' if self.checkpoint else 'SOURCE'}: base-model weights must be a file, got {weights}")
        if (self.data is None) == (self.fashion_mnist is None):
            raise ValueError("--data DIR or --fashion-mnist [DIR]: exactly one is required")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"--data: no such folder {self.data}")
        if self.fashion_mnist is not None and not Path(self.fashion_mnist).is_dir():
            raise ValueError(f"--fashion-mnist: no folder {self.fashion_mnist}. {fashion_mnist.HOW_TO_GET}")

    @property
    def encoder_path(self) -> str | None:
        return self.checkpoint if self.checkpoint is not None else self.source


# Options that may change when a run dir is resumed: where things are and how the run is watched.
# --epochs may grow (the run is extended; harness.run_dir), never shrink.
MUTABLE_ON_RESUME = frozenset({"run_dir", "source", "checkpoint", "data", "fashion_mnist", "num_workers", "device",
                               "keep_last"})
