"""The options of ``tec-train finetune`` as one dataclass, and their checks.

Data flow: command-line flags (+ a pipeline's [finetune] table, + the run dir's stored options on
resume) --> **FinetuneConfig** --> ``validate`` (no model, no data read) --> finetune.Finetuner.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tec_cache.core import fashion_mnist
from tec_cache.runtime.config import (
    NON_NEGATIVE,
    PATH_METAVAR,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    WORKERS,
    NestedConfig,
    check_fields,
    flat_values,
    group,
    in_range,
    nested_config,
    option,
)

from .augment import NO_AUGMENT, finetune_train_transform
from .eval_config import BASEMODEL
from .harness.runtime import AMP_MODES
from .harness.trackers import check_wandb_installed
from .student import parse_model_name

MIXUP_MODES = ("batch", "pair", "elem")


@dataclass
class EncoderSource:
    """The encoder to fine-tune: SOURCE (or --checkpoint) and what it needs to be read (see
    encoder_weights.read_encoder_weights)."""

    source: str | None = option(None, "The encoder: export folder, run dir, checkpoint-*.pt, reference checkpoint "
                                "or base-model weights.")
    model: str | None = option(None, "Encoder size of a reference checkpoint, e.g. vit_base_patch16 (ours record it).")
    basemodel: str | None = option(None, "SOURCE (or --checkpoint) is this registry base model's weights (neither "
                                   "given: its official file, fetched and verified), or timm:NAME / hf-hub:ORG/REPO: a "
                                   "timm ViT with its own pretrained weights and normalisation",
                                   check=BASEMODEL)
    arch: str | None = option(None, "SOURCE (or --checkpoint) is the weights of this timm ViT.")
    checkpoint: str | None = option(None, "Base-model weights file (instead of SOURCE), with --basemodel/--arch.")
    mlp_token: bool = option(True, "Keep and train a TEC source's cls MLP as the README runs, or fold it into cls_token.",
                             flag="--mlp-token/--fold-mlp-token")

    @property
    def path(self) -> str | None:
        """The weights file or folder: --checkpoint, else SOURCE."""
        return self.checkpoint if self.checkpoint is not None else self.source

    def validate(self) -> None:
        if self.model is not None:
            try:
                parse_model_name(self.model)
            except ValueError as e:
                raise ValueError(f"--model: {e}") from None
        base = self.basemodel is not None or self.arch is not None
        if self.checkpoint is not None:
            if not base:
                raise ValueError("--checkpoint: base-model weights need --basemodel NAME or --arch TIMM_NAME")
            if self.source is not None:
                raise ValueError(f"--checkpoint: give the base-model weights once, as SOURCE or --checkpoint "
                                 f"(got both {self.source} and {self.checkpoint})")
        from tec_cache.core.weights import is_url

        weights = self.path
        if weights is None:
            if self.basemodel is not None:
                return  # a registry name alone: its official weights are fetched
            raise ValueError("SOURCE: an export folder, run dir, checkpoint file, or base-model weights is required")
        if not (base and is_url(weights)) and not Path(weights).exists():
            raise ValueError(f"{'--checkpoint' if self.checkpoint else 'SOURCE'}: no such file or folder {weights}")
        if base and not Path(weights).is_file():
            raise ValueError(f"{'--checkpoint' if self.checkpoint else 'SOURCE'}: base-model weights must be a file, got {weights}")


@dataclass
class LabelledData:
    """The labelled images: exactly one of --data and --fashion-mnist, subsets for quick runs, the
    evaluation crop, the loader."""

    data: str | None = option(None, "ImageNet-style folder with train/ and val/ class folders.", metavar=PATH_METAVAR)
    fashion_mnist: str | None = option(None, "Fashion-MNIST idx folder.")
    train_subset: int | None = option(None, "Train on a seeded class-balanced subset of N images.", check=POSITIVE_INT)
    val_subset: int | None = option(None, "Evaluate on a seeded class-balanced subset of N images.", check=POSITIVE_INT)
    crop_pct: float | None = option(None, "Eval centre-crop fraction", check=in_range(0.0, 1.0, lo_open=True),
                                    default_text="0.875 for --data, 1.0 for Fashion-MNIST")
    num_workers: int = option(4, "Loader worker processes per rank", check=WORKERS)

    def validate(self) -> None:
        if (self.data is None) == (self.fashion_mnist is None):
            raise ValueError("--data DIR or --fashion-mnist [DIR]: exactly one is required")
        if self.data is not None and not Path(self.data).is_dir():
            raise ValueError(f"--data: no such folder {self.data}")
        if self.fashion_mnist is not None and not Path(self.fashion_mnist).is_dir():
            raise ValueError(f"--fashion-mnist: no folder {self.fashion_mnist}. {fashion_mnist.HOW_TO_GET}")


@dataclass
class ClassifierOptions:
    """The classifier built on the encoder."""

    global_pool: bool = option(True, "Head on the mean patch token + fc_norm, or on the normed cls token.",
                               flag="--global-pool/--cls-token")
    img_size: int | None = option(None, "Fine-tuning resolution; pos_embed is re-sampled", check=POSITIVE_INT,
                                  default_text="the encoder's")
    drop_path: float = option(0.1, "Stochastic depth rate", check=in_range(0.0, 1.0, hi_open=True))


@dataclass
class FinetuneOptimisation:
    """Schedule, optimiser with layer-wise lr decay, and seed (method.md 6)."""

    epochs: int = option(100, "Epochs; may be raised when resuming, to extend the run", check=POSITIVE_INT)
    warmup_epochs: float = option(5.0, "Linear warm-up epochs", check=NON_NEGATIVE)
    batch_size: int = option(128, "Micro-batch per process", check=POSITIVE_INT)
    accum_iter: int = option(1, "Micro-batches per optimizer step", check=POSITIVE_INT)
    blr: float = option(5e-4, "Base lr: lr = blr x effective batch / 256", check=POSITIVE)
    lr: float | None = option(None, "Absolute peak lr (overrides --blr).", check=POSITIVE)
    min_lr: float = option(1e-6, "Final lr of the cosine", check=NON_NEGATIVE)
    layer_decay: float = option(0.65, "Layer-wise lr decay", check=in_range(0.0, 1.0, lo_open=True))
    weight_decay: float = option(0.05, "AdamW weight decay", check=NON_NEGATIVE)
    clip_grad: float | None = option(None, "Clip the gradient norm", check=POSITIVE, default_text="off, as the reference")
    seed: int = option(0, "Seed of the head, shuffling, augmentation and subsets", check=SEED)


@dataclass
class Augmentation:
    """Training augmentation and loss: RandAugment, random erasing, Mixup/CutMix, label smoothing."""

    aa: str = option("rand-m9-mstd0.5-inc1", "timm auto-augment string, or none")
    reprob: float = option(0.25, "Random-erasing probability", check=in_range(0.0, 1.0))
    mixup: float = option(0.8, "Mixup alpha; 0 with --cutmix 0 turns mixing off", check=NON_NEGATIVE)
    cutmix: float = option(1.0, "CutMix alpha", check=NON_NEGATIVE)
    mixup_prob: float = option(1.0, "Probability of mixing a batch", check=in_range(0.0, 1.0))
    mixup_switch_prob: float = option(0.5, "Probability of CutMix instead of Mixup", check=in_range(0.0, 1.0))
    mixup_mode: str = option("batch", "How mixing pairs images", choices=MIXUP_MODES)
    smoothing: float = option(0.1, "Label smoothing", check=in_range(0.0, 1.0, hi_open=True))

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def validate(self) -> None:
        if self.aa.lower() not in NO_AUGMENT:
            try:
                finetune_train_transform(32, aa=self.aa, reprob=0.0)
            except Exception as e:  # noqa: BLE001 - timm's parser raises several kinds
                raise ValueError(f"--aa: {self.aa!r} is not a timm auto-augment string "
                                 f"(e.g. rand-m9-mstd0.5-inc1, or none): {e}") from None


@dataclass
class FinetuneRunControl:
    """Where the run computes and what it keeps."""

    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    amp: str = option("auto", "auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off", choices=AMP_MODES)
    keep_last: int = option(1, "Fine-tuning checkpoints kept", check=POSITIVE_INT)
    log_every: int = option(20, "Where output is not a terminal, a progress line every N optimizer steps",
                            check=POSITIVE_INT)
    tensorboard: bool = option(True, "Write the per-epoch metrics records as TensorBoard scalars to "
                               "<run dir>/tensorboard (when the tensorboard package is installed).")
    wandb: str | None = option(None, "Log the metrics records to this Weights & Biases project too (rank 0; "
                               "the W&B run id is kept in the run dir, so a resumed job continues the same W&B run; "
                               "WANDB_MODE, WANDB_ENTITY, WANDB_DIR, ... apply).", default_text="off", metavar="PROJECT")


@nested_config
class FinetuneConfig(NestedConfig):
    """Every option of ``tec-train finetune``, one component each (encoder source, labelled data,
    classifier, optimisation, augmentation, run control). A field ``foo_bar`` of any component is
    the option ``--foo-bar`` and the key ``foo_bar`` of a pipeline's [finetune] table. Defaults are
    the reference recipe (method.md 6, README ViT-B row); each field declares its default, bound and help once."""

    run_dir: str = option(help="Run folder: finetune-<epoch>.pt, metrics.jsonl, config.json, result.json. "
                          "Re-running resumes it.", metavar=PATH_METAVAR)
    encoder: EncoderSource = group(EncoderSource)
    labelled: LabelledData = group(LabelledData)
    classifier: ClassifierOptions = group(ClassifierOptions)
    optim: FinetuneOptimisation = group(FinetuneOptimisation)
    augment: Augmentation = group(Augmentation)
    run: FinetuneRunControl = group(FinetuneRunControl)

    def to_json(self) -> dict[str, Any]:
        """The flat options a run stores (config.json, checkpoints) and compares on resume."""
        return flat_values(self)

    def validate(self) -> None:
        """Option checks that need no model and no data loading; ValueError names the option."""
        check_fields(self)
        if self.augment.mixup_active and self.optim.batch_size % 2:
            raise ValueError(f"--batch-size: Mixup/CutMix needs an even batch size, got {self.optim.batch_size} "
                             "(or set --mixup 0 --cutmix 0)")
        self.augment.validate()
        if Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ValueError(f"--run-dir: {self.run_dir} exists and is not a folder")
        self.encoder.validate()
        self.labelled.validate()
        check_wandb_installed(self.run.wandb)


# Options that may change when a run dir is resumed: where things are and how the run is watched.
# --epochs may grow (the run is extended; harness.run_dir), never shrink.
MUTABLE_ON_RESUME = frozenset({"run_dir", "source", "checkpoint", "data", "fashion_mnist", "num_workers", "device",
                               "keep_last", "log_every", "tensorboard", "wandb"})
