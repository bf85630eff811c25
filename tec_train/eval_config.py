"""The options of ``tec-train knn`` and ``tec-train linear``, declared once.

Data flow: defaults < a pipeline's [eval] table < flags --options.eval_config--> EvalConfig --validate--> evaluate.run_knn |
evaluate.run_linear (encoder_weights.load_encoder + labelled.open_labelled + features) --> results.
Also holds DataSubsets, the [data] table of the CPU pipelines (how many Fashion-MNIST images a
miniature run uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tec_cache.core.basemodels import REGISTRY, is_timm_source
from tec_cache.runtime.config import (
    NON_NEGATIVE,
    PATH_METAVAR,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    WORKERS,
    Check,
    check_fields,
    in_range,
    option,
)

POOLS = ("avg", "cls")
PROBE_OPTIMIZERS = ("lars", "sgd")
# --basemodel of knn, linear and finetune: a registry name, timm:NAME or hf-hub:ORG/REPO.
BASEMODEL = Check(lambda v: isinstance(v, str) and (v in REGISTRY or is_timm_source(v)),
                  f"expected one of {', '.join(sorted(REGISTRY))}, timm:NAME or hf-hub:ORG/REPO")


@dataclass
class EvalConfig:
    """Every option of ``tec-train knn`` and ``tec-train linear``; field ``foo_bar`` is ``--foo-bar``."""

    source: str | None = option(None, "The encoder: export folder, run dir, checkpoint or base-model weights.")
    # Data: exactly one of data and fashion_mnist (the folder of the idx files).
    data: str | None = option(None, "ImageNet-style folder with train/ and val/ class folders.", metavar=PATH_METAVAR)
    fashion_mnist: str | None = option(None, "Fashion-MNIST idx folder.")
    # Encoder details (see encoder_weights.load_encoder).
    model: str | None = option(None, "Encoder size of a reference checkpoint, e.g. vit_base_patch16.")
    basemodel: str | None = option(None, "SOURCE is this registry base model's weights (without SOURCE: its official "
                                   "file, fetched and verified), or timm:NAME / hf-hub:ORG/REPO: a timm ViT with its "
                                   "own pretrained weights (SOURCE: a weights file for it instead) and normalisation",
                                   check=BASEMODEL)
    arch: str | None = option(None, "SOURCE is the weights of this timm ViT.")
    img_size: int | None = option(None, "Evaluation resolution; pos_embed is re-sampled", check=POSITIVE_INT,
                                  default_text="the encoder's")
    patch_size: int | None = option(None, "Base models: patch size", check=POSITIVE_INT, default_text="the arch's")
    depth: int | None = option(None, "Base models: block count of a ViT shallower than its --arch.", check=POSITIVE_INT)
    # Features.
    pool: str = option("avg", "avg (mean patch token after the final norm) | cls", choices=POOLS)
    batch_size: int = option(256, "Images per feature-extraction batch (and the probe's batch)", check=POSITIVE_INT)
    num_workers: int = option(4, "Loader worker processes", check=WORKERS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    crop_pct: float | None = option(None, "Centre-crop fraction", check=in_range(0, 1, lo_open=True),
                                    default_text="0.875 for --data, 1.0 for Fashion-MNIST")
    train_subset: int | None = option(None, "Use a seeded class-balanced subset of N train images.", check=POSITIVE_INT)
    val_subset: int | None = option(None, "Use a seeded class-balanced subset of N val images.", check=POSITIVE_INT)
    seed: int = option(0, "Seed of the subsets (and of the probe's init and shuffling)", check=SEED)
    # kNN.
    k: int = option(20, "Neighbours that vote", check=POSITIVE_INT)
    temperature: float = option(0.07, "Vote weight exp(cosine / T)", check=POSITIVE)
    # Linear probe.
    epochs: int = option(90, "Probe epochs over the precomputed features", check=POSITIVE_INT)
    lr: float | None = option(None, "Peak lr of the probe", check=POSITIVE, default_text="0.1 x batch / 256, MAE's blr")
    weight_decay: float = option(0.0, "Weight decay of the probe", check=NON_NEGATIVE)
    warmup_epochs: float = option(10.0, "Linear warm-up epochs of the probe", check=NON_NEGATIVE)
    optimizer: str = option("sgd", "sgd (momentum 0.9) | lars (MAE's; needs MAE's 16384 batch to train well)",
                            choices=PROBE_OPTIMIZERS)

    def validate(self) -> None:
        """Checks that need no model and no data; ValueError names the option."""
        check_fields(self)
        from tec_cache.core.weights import is_url

        if self.source is None:
            if self.basemodel is not None:
                return  # a registry name alone: its official weights are fetched
            raise ValueError("SOURCE: an export folder, run dir, checkpoint file, or base-model weights is required")
        base = self.basemodel is not None or self.arch is not None
        if not (base and is_url(self.source)) and not Path(self.source).exists():
            raise ValueError(f"SOURCE: no such file or folder {self.source}")
        if self.model is not None:
            from .student import parse_model_name

            try:
                parse_model_name(self.model)
            except ValueError as e:
                raise ValueError(f"--model: {e}") from None


@dataclass
class DataSubsets:
    """A CPU pipeline's [data] table: the class-balanced Fashion-MNIST subsets scripts/miniature.py uses."""

    train_images: int = option(10000, "Training images (pretraining and the kNN bank / probe training set)",
                               check=POSITIVE_INT)
    test_images: int = option(10000, "Test images the probes are scored on", check=POSITIVE_INT)
