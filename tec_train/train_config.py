"""The options of ``tec-train run``: one component each, and their checks.

Data flow: command-line flags (+ a pipeline's [pretrain] or [base] table, + the run dir's stored
options on resume) --> **TrainConfig** --> ``validate`` (no model, no data read) --> train.Trainer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.core.basemodels import TargetRecipe
from tec_cache.core.images import SOURCE_HELP
from tec_cache.core.views import RESIZERS
from tec_cache.format.remote import is_remote
from tec_cache.runtime.config import (
    NON_NEGATIVE,
    PATH_METAVAR,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    WORKERS,
    NestedConfig,
    check_fields,
    flag_name,
    flat_values,
    group,
    in_range,
    nested_config,
    option,
)

from .harness.runtime import AMP_MODES
from .harness.trackers import check_wandb_installed
from .student import parse_model_name

VIEW_ORDERS = ("cycle", "permute")
# The objectives.OBJECTIVES names (that module builds them; it reads this config, so the names are
# stated here and a test holds the two equal).
OBJECTIVE_NAMES = ("tec", "mae")
_ONLINE = "Online mode: "
# TargetRecipe field -> (tec-train run's option, help prefix): the recipe's img_size and patch_size
# are the student's in online mode, and its depth is --base-depth, --depth being the student's.
ONLINE_RECIPE = {"basemodel": ("online_basemodel", "Online mode, the base model run inside the step: "),
                 "arch": ("arch", _ONLINE), "depth": ("base_depth", _ONLINE), "topk": ("topk", _ONLINE),
                 "tau": ("tau", _ONLINE), "last_layers": ("last_layers", _ONLINE)}


@dataclass
class TargetSource:
    """Where a step's targets come from: a cache, online (the base model inside the step, from a
    target recipe as ``tec-cache build`` takes it), or, for the MAE objective, the pixels of --data."""

    cache: str | None = option(None, "Stage-1 cache to train from: a folder, or its URL (http(s)://, s3://, "
                               "gs://, ... through fsspec; 'pipe:COMMAND' with {path}); remote shards stream, each "
                               "checked against its sha256 as it arrives.")
    cache_dir: str | None = option(None, "Read-through folder for a remote --cache: shards are kept there once "
                                   "fetched (and checked again when read back).", default_text="none: stream only",
                                   metavar=PATH_METAVAR)
    # Online mode's base model and its targets: tec-cache build's recipe, under the option names
    # run dirs have always stored (the student has its own --depth, --img-size and --patch-size).
    base: TargetRecipe = group(TargetRecipe, flat=ONLINE_RECIPE)
    checkpoint: str | None = option(None, "Online mode: the base model's weights, a local file or a URL (http(s)://, "
                                    "s3://, ..., hf-hub:ORG/REPO, optionally @REVISION); a registry --online-basemodel fetches its "
                                    "official file and timm:NAME / hf-hub:ORG/REPO their own without it.")
    checkpoint_sha256: str | None = option(None, "Online mode: sha256 the base model's weights file must have.")
    data: str | None = option(None, "Online mode and --objective mae: " + SOURCE_HELP)
    resize: str | None = option(None, "Online mode: how views are resized, as the cache compared with was (its "
                                "views.recipe.resize, which `tec-cache inspect` shows): torch-bicubic-u8 | "
                                "torch-bicubic-f32 | pil-bicubic (caches built before the resizer was recorded) | auto",
                                default_text="torch-bicubic-u8")

    @property
    def online(self) -> bool:
        return self.base.basemodel is not None or self.base.arch is not None

    def recipe(self, img_size: int | None, patch_size: int | None) -> TargetRecipe:
        """Online mode's target recipe (the base model's geometry is the student's)."""
        return dataclasses.replace(self.base, img_size=img_size, patch_size=patch_size)

    def validate(self, objective: str, external_source: bool) -> None:
        """The options that fit the mode: exactly one source, and no option of another mode."""
        given = {k for k, v in flat_values(self).items() if v is not None}
        online_only = [n for n in ("checkpoint", "checkpoint_sha256", "data", "topk", "tau", "last_layers", "base_depth", "resize")
                       if n in given]
        if objective == "mae" and not external_source:
            targets = [n for n in ("cache", "online_basemodel", "arch", "checkpoint", "checkpoint_sha256", "topk", "tau", "last_layers", "base_depth",
                                   "resize") if n in given]
            if targets:
                raise ValueError(f"{flag_name(targets[0])}: --objective mae learns from pixels; it takes --data only, no base model or cache")
            if self.data is None or not (is_remote(self.data) or Path(self.data).exists()):
                raise ValueError(f"--data: --objective mae needs an image folder or .tar shards, got {self.data!r}")
            return
        if external_source:
            if self.cache is not None or self.online or online_only:
                raise ValueError("a target feed was passed in: --cache and the online options must not be set")
            return
        if self.cache_dir is not None and not (self.cache is not None and is_remote(self.cache)):
            raise ValueError("--cache-dir: the read-through folder is for a remote --cache (a URL)")
        from tec_cache.core.weights import check_sha256

        check_sha256(self.checkpoint_sha256)
        basemodel = self.base.basemodel
        if basemodel is not None:
            from tec_cache.core.basemodels import REGISTRY, is_timm_source

            if basemodel not in REGISTRY and not is_timm_source(basemodel):
                raise ValueError(f"--online-basemodel: expected one of {', '.join(sorted(REGISTRY))}, timm:NAME or "
                                 f"hf-hub:ORG/REPO, got {basemodel!r}")
        if self.cache is not None and self.online:
            raise ValueError("--cache and --online-basemodel/--arch exclude each other: train from a cache or online")
        if self.cache is None and not self.online:
            raise ValueError("one of --cache CACHE or --online-basemodel NAME (or --arch TIMM_NAME) is required")
        if self.cache is not None:
            if online_only:
                raise ValueError(f"{flag_name(online_only[0])}: only for online mode (--online-basemodel), not with --cache")
            if not is_remote(self.cache) and not Path(self.cache).is_dir():
                raise ValueError(f"--cache: no such cache folder {self.cache}")
            return
        from tec_cache.core.weights import is_url

        if self.checkpoint is None:
            if basemodel is None:
                raise ValueError("--checkpoint: online mode with --arch needs the base model's weights (a file or a URL)")
        elif not is_url(self.checkpoint) and not Path(self.checkpoint).is_file():
            raise ValueError(f"--checkpoint: online mode needs the base model's weights file or a URL, got {self.checkpoint!r}")
        if self.data is None or not (is_remote(self.data) or Path(self.data).exists()):
            raise ValueError(f"--data: online mode needs an image folder or .tar shards, got {self.data!r}")
        if self.resize is not None and self.resize != "auto" and self.resize not in RESIZERS:
            raise ValueError(f"--resize: expected auto or one of {list(RESIZERS)}, got {self.resize!r}")


@dataclass
class StudentOptions:
    """The student ViT and its masking (method.md 3)."""

    model: str = option("vit_base_patch16", "Student size, timm-style: vit_tiny_patch16, vit_small_patch16, "
                        "vit_base_patch16, vit_large_patch16, ...")
    depth: int | None = option(None, "Override the student's depth (tiny CPU models).", check=POSITIVE_INT)
    img_size: int | None = option(None, "Image size", check=POSITIVE_INT, default_text="the cache's view size; 224 online")
    patch_size: int | None = option(None, "Patch size", check=POSITIVE_INT, default_text="the --model name's")
    mask_ratio: float = option(0.75, "Fraction of patches masked", check=in_range(0.0, 1.0, hi_open=True))
    init_from: str | None = option(None, "Start from a TEC pretraining checkpoint ({'model': ...}, reference or "
                                   "ours), loaded strictly.", metavar=PATH_METAVAR)


@dataclass
class Optimisation:
    """Schedule, optimiser and seed (method.md 4)."""

    epochs: int = option(300, "Epochs; may be raised when resuming, to extend the run", check=POSITIVE_INT)
    warmup_epochs: float = option(40.0, "Linear warm-up epochs, clipped to --epochs", check=NON_NEGATIVE)
    batch_size: int = option(256, "Micro-batch per process", check=POSITIVE_INT)
    accum_iter: int = option(1, "Micro-batches per optimizer step", check=POSITIVE_INT)
    blr: float = option(1.5e-4, "Base lr: lr = blr x effective batch / 256", check=POSITIVE)
    lr: float | None = option(None, "Absolute peak lr (overrides --blr).", check=POSITIVE)
    min_lr: float = option(0.0, "Final lr of the cosine", check=NON_NEGATIVE)
    weight_decay: float = option(0.05, "AdamW weight decay", check=NON_NEGATIVE)
    clip_grad: float | None = option(None, "Clip the gradient norm to this", check=POSITIVE,
                                     default_text="off, as the reference")
    seed: int = option(0, "Seed of initialisation, shuffling and masks", check=SEED)


@dataclass
class LoaderOptions:
    num_workers: int = option(4, "Loader worker processes per rank", check=WORKERS)
    view_order: str = option("cycle", "Which cached view-epoch epoch e reads: cycle (e mod K) | permute",
                             choices=VIEW_ORDERS)
    view_epochs: int | None = option(None, "Train from the first K view-epochs of the cache (one cache serves a "
                                     "study of K)", check=POSITIVE_INT, default_text="all the cache holds")


@dataclass
class Validation:
    """The held-out target loss (held_out.py)."""

    val_cache: str | None = option(None, "A cache of views the run never trains on, from the same base model: its "
                                   "loss terms are logged as val_loss_fea and val_loss_att.")
    val_every: int = option(1000, "Held-out loss every N steps (and at the end of the run)", check=POSITIVE_INT)

    def validate(self, objective: str) -> None:
        if self.val_cache is None:
            return
        if objective != "tec":
            raise ValueError("--val-cache: the held-out loss compares base-model targets; --objective mae has none")
        if not is_remote(self.val_cache) and not Path(self.val_cache).is_dir():
            raise ValueError(f"--val-cache: no such cache folder {self.val_cache}")


@dataclass
class RunControl:
    """How the run is kept and watched: checkpoints, metrics, device, precision."""

    ckpt_every: int = option(1000, "Checkpoint every N steps (and at every epoch end)", check=POSITIVE_INT)
    keep_last: int = option(3, "Checkpoints kept", check=POSITIVE_INT)
    log_every: int = option(20, "Metrics record every N steps", check=POSITIVE_INT)
    max_steps: int | None = option(None, "Stop after this many optimizer steps in total.", check=POSITIVE_INT)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    amp: str = option("auto", "auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off", choices=AMP_MODES)
    compile: bool = option(False, "torch.compile the student (CUDA only).")
    log_samples: bool = option(False, "Write which samples each rank trains on, per micro-batch, to "
                               "samples-rank<R>.jsonl in the run dir (to audit a resume).")
    tensorboard: bool = option(True, "Write the metrics records as TensorBoard scalars to <run dir>/tensorboard "
                               "(when the tensorboard package is installed).")
    wandb: str | None = option(None, "Log the metrics records to this Weights & Biases project too (rank 0; "
                               "the W&B run id is kept in the run dir, so a resumed job continues the same W&B run; "
                               "WANDB_MODE, WANDB_ENTITY, WANDB_DIR, ... apply).", default_text="off", metavar="PROJECT")


@nested_config
class TrainConfig(NestedConfig):
    """Every option of ``tec-train run``, one component each (target source, student, optimisation,
    loader, held-out loss, run control). A field ``foo_bar`` of any component is the option ``--foo-bar``, the key
    ``foo_bar`` of a pipeline's [pretrain] table and of the run's stored options; each declares its
    default, bound and help once (tec_cache.runtime.config.option)."""

    run_dir: str = option(help="Run folder: checkpoints, metrics.jsonl, config.json. Re-running resumes it.",
                          metavar=PATH_METAVAR)
    objective: str = option("tec", "tec: learn a base model's targets (--cache or online) | mae: plain MAE on "
                            "--data pixels, to make a base model from scratch", choices=OBJECTIVE_NAMES)
    targets: TargetSource = group(TargetSource)
    student: StudentOptions = group(StudentOptions)
    optim: Optimisation = group(Optimisation)
    loader: LoaderOptions = group(LoaderOptions)
    val: Validation = group(Validation)
    run: RunControl = group(RunControl)

    def to_json(self) -> dict[str, Any]:
        """The flat options a run stores (config.json, checkpoints) and compares on resume."""
        return flat_values(self)

    def validate(self, external_source: bool = False) -> None:
        """Option checks that need no model and no data; ValueError names the option."""
        check_fields(self)
        try:
            parse_model_name(self.student.model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
        if self.student.init_from is not None and not Path(self.student.init_from).is_file():
            raise ValueError(f"--init-from: no such file {self.student.init_from}")
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"--run-dir: {self.run_dir} exists and is not a folder")
        self.targets.validate(self.objective, external_source)
        self.val.validate(self.objective)
        check_wandb_installed(self.run.wandb)
        if self.loader.view_epochs is not None and self.targets.cache is None:
            raise ValueError("--view-epochs: takes the first K view-epochs of a --cache; online and pixel "
                             "sources cut fresh views every epoch")


# Options that may differ when a run dir is resumed: they change where things are or how the run
# is watched, never which steps it takes. The paths are free because a cache or dataset may move;
# what they hold is compared through the resolved target spec instead. --epochs may grow (the run
# is extended; harness.run_dir), never shrink.
MUTABLE_ON_RESUME = frozenset({
    "run_dir", "cache", "cache_dir", "checkpoint", "checkpoint_sha256", "data", "init_from", "num_workers", "ckpt_every",
    "keep_last", "log_every", "max_steps", "device", "compile", "val_cache", "val_every", "log_samples", "tensorboard",
    "wandb",
})
