"""End-to-end fine-tuning with the reference recipe (spec 6, MAE's main_finetune), on timm parts.

Data flow: encoder source (encoder_weights.read_encoder_weights) --> timm ViT with a new head
(global-pool + fc_norm, or cls token + norm) --> labelled data (labelled.open_labelled) with
timm's RandAugment / random erasing and Mixup/CutMix --> AdamW with layer-wise lr decay,
per-iteration warm-up + cosine --> every epoch: evaluation, **metrics.jsonl**, an atomic
finetune-<epoch>.pt in the run dir (resumable), and result.json at the end.

Runs alone or under torchrun (DDP: nccl on CUDA, gloo on CPU); bf16 autocast on CUDA only.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
from timm.data import Mixup
from timm.layers import Mlp
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from tec_cache import fashion_mnist
from tec_cache.basemodels import REGISTRY
from tec_cache.dist import DistInfo, destroy_process_group, dist_info, init_process_group, resolve_device
from tec_cache.faults import fault_point
from tec_cache.format.fs import write_json_atomic, write_text_atomic

from .checkpoint import (CheckpointError, CheckpointKind, capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint,
                         restore_rng, save_checkpoint)
from .labelled import DEFAULT_CROP_PCT, LabelledSplits, open_labelled
from .encoder_weights import EncoderWeights, build_vit, load_state_strict, read_encoder_weights
from .augment import NO_AUGMENT, finetune_train_transform
from .evaluate import eval_transform
from .export import CONFIG_KEYS
from .schedule import WarmupCosine, absolute_lr
from .student import parse_model_name
from .train import AMP_MODES, NonFiniteLossError, ResumeError, resolve_amp

METRICS_NAME = "metrics.jsonl"
RESULT_NAME = "result.json"
FINETUNE_FORMAT = "tec-train-finetune"
FINETUNE_VERSION = 1
MIXUP_MODES = ("batch", "pair", "elem")
FINETUNE = CheckpointKind("finetune", 4, FINETUNE_FORMAT, FINETUNE_VERSION, "fine-tuning")  # numbered by epochs done


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
                raise ValueError(f"{_opt(name)}: must be a positive integer, got {value!r}")
        for name in ("img_size", "train_subset", "val_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_opt(name)}: must be a positive integer, got {value!r}")
        for name in ("blr", "lr", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{_opt(name)}: must be a positive number, got {value!r}")
        for name in ("warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{_opt(name)}: must be a number >= 0, got {value!r}")
        for name, lo, hi, closed in (("layer_decay", 0.0, 1.0, True), ("drop_path", 0.0, 1.0, False),
                                     ("smoothing", 0.0, 1.0, False), ("reprob", 0.0, 1.0, True),
                                     ("mixup_prob", 0.0, 1.0, True), ("mixup_switch_prob", 0.0, 1.0, True)):
            value = getattr(self, name)
            ok = (lo < value <= hi) if name == "layer_decay" else (lo <= value <= hi if closed else lo <= value < hi)
            if not ok:
                rng = "(0, 1]" if name == "layer_decay" else ("[0, 1]" if closed else "[0, 1)")
                raise ValueError(f"{_opt(name)}: must be in {rng}, got {value!r}")
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


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


# Options that may change when a run dir is resumed: where things are, how the run is watched, and
# --epochs (to extend a run; the cosine then follows the new length from the resumed epoch on).
MUTABLE_ON_RESUME = frozenset({"run_dir", "source", "checkpoint", "data", "fashion_mnist", "num_workers", "device",
                               "epochs", "keep_last"})


def _check_options(stored: dict[str, Any], current: dict[str, Any], ckpt: Path) -> None:
    for name, value in current.items():
        if name in MUTABLE_ON_RESUME or name not in stored:
            continue
        if stored[name] != value:
            raise ResumeError(f"{_opt(name)}: the fine-tuning run in {ckpt.parent} was started with {stored[name]!r}, "
                              f"now {value!r}; a run dir resumes only with the same settings (use a new --run-dir)")


def finetune_config_for_run_dir(run_dir: str, given: dict[str, Any]) -> FinetuneConfig:
    """The given options on top of the run dir's stored ones when it has a checkpoint (so
    ``tec-train finetune --run-dir R`` alone resumes), else on top of the defaults."""
    ckpt = latest_finetune_checkpoint(Path(run_dir))
    if ckpt is None:
        return FinetuneConfig(**{**given, "run_dir": run_dir})
    stored = load_finetune_checkpoint(ckpt)["config"]["options"]
    _check_options(stored, given, ckpt)
    known = {f.name for f in fields(FinetuneConfig)}
    return FinetuneConfig(**{**{k: v for k, v in stored.items() if k in known}, **given, "run_dir": run_dir})


# ---- model ------------------------------------------------------------------------------------
class FinetuneViT(VisionTransformer):
    """timm ViT with the reference's optional input adaptor: cls = cls_token_mlp(cls_token) (spec 6)."""

    def __init__(self, *, mlp_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cls_token_mlp = (Mlp(self.embed_dim, hidden_features=4 * self.embed_dim, out_features=self.embed_dim)
                              if mlp_token else None)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token_mlp is None:
            return super()._pos_embed(x)
        cls = self.cls_token_mlp(self.cls_token)  # [1, 1, C]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, 1+L, C]
        return self.pos_drop(x)


def build_finetune_model(weights: EncoderWeights, num_classes: int, *, global_pool: bool = True,
                         drop_path: float = 0.1, mlp_token: bool = True) -> tuple[VisionTransformer, dict[str, Any]]:
    """The classifier the reference fine-tunes, with ``weights`` loaded; returns (model, facts).

    avg mode drops the pretrained norm.* (global pool feeds a new fc_norm, as the reference);
    cls mode keeps it. The head is trunc_normal(std 2e-5) / 0 and pos_embed is frozen, as the
    reference re-creates it from the checkpoint without gradient.
    """
    keep_mlp = mlp_token and weights.cls_mlp is not None
    kwargs = dict(num_classes=num_classes, global_pool="avg" if global_pool else "token", drop_path_rate=drop_path)
    if keep_mlp:
        model: VisionTransformer = FinetuneViT(mlp_token=True, **{k: weights.config[k] for k in CONFIG_KEYS}, **kwargs)
        state = {**weights.state, **weights.cls_mlp}  # the raw cls token replaces the folded one
    else:
        model = build_vit(weights.config, **kwargs)
        state = dict(weights.state)
    if global_pool:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    # The new parts: head and (avg mode) fc_norm keep their fresh values; everything else must load,
    # except norm.* of the reference's converted releases, which have none (spec 5.3).
    new = ("head.", "fc_norm.", *(("norm.",) if weights.facts.get("kind") == "reference" else ()))
    load_state_strict(model, state, str(weights.facts.get("path")), allow_missing=new)
    with torch.no_grad():
        nn.init.trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    model.pos_embed.requires_grad_(False)
    return model, {"cls_mlp_kept": keep_mlp, "global_pool": global_pool, "num_classes": num_classes}


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The reference's layer id (spec 6): patch_embed/pos_embed 0, blocks.j j+1, everything else num_layers.

    cls_token gets -1, which indexes the last scale (1.0): TEC's quirk, kept on purpose.
    """
    if name == "cls_token":
        return -1
    if name == "pos_embed" or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale of every trainable parameter: layer_decay ** (num_layers - layer id), num_layers = depth + 1."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    return {n: scales[layer_id_for_vit(n, num_layers)] for n, p in model.named_parameters() if p.requires_grad}


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the reference's param_groups_lrd: (layer, decay) groups with an ``lr_scale``.

    No weight decay for 1-D parameters and timm's no_weight_decay set (pos_embed, cls_token).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = len(model.blocks) + 1
    scales = layer_decay_scales(model, layer_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in skip
        key = f"layer_{layer_id_for_vit(name, num_layers)}_{'no_decay' if no_decay else 'decay'}"
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": scales[name], "group_name": key})
        g["params"].append(p)
    return list(groups.values())


# ---- checkpoints --------------------------------------------------------------------------------
def finetune_checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return FINETUNE.path(run_dir, epoch)


def list_finetune_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    return list_checkpoints(run_dir, FINETUNE)


def latest_finetune_checkpoint(run_dir: Path) -> Path | None:
    return latest_checkpoint(run_dir, FINETUNE)


def save_finetune_checkpoint(run_dir: Path, state: dict[str, Any], epoch: int, keep_last: int) -> Path:
    """Atomic write (temp sibling, fsync, rename, fsync dir) numbered by epoch; keeps the newest ``keep_last``."""
    return save_checkpoint(run_dir, state, epoch, keep_last, FINETUNE)


def load_finetune_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path, FINETUNE)
    except CheckpointError as e:
        raise ResumeError(str(e)) from e


def _truncate_metrics(path: Path, next_epoch: int) -> None:
    """Keep the records of epochs the checkpoint has seen (< next_epoch); drop later and torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and rec["epoch"] < next_epoch:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


# ---- the run ------------------------------------------------------------------------------------
class FinetuneReporter:
    """Progress hooks, called on rank 0 only; the CLI's rich display implements them."""

    def start(self, *, epochs: int, start_epoch: int, steps_per_epoch: int, summary: dict[str, Any]) -> None:
        """Once, before the first epoch."""

    def step(self, epoch: int, micro_batch: int) -> None:
        """After every micro-batch."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        """With every record appended to metrics.jsonl."""

    def message(self, text: str) -> None:
        """A one-line notice."""

    def finish(self) -> None:
        """Once, when the run ends, normally or not."""


@dataclass
class FinetuneResult:
    run_dir: Path
    epochs_run: int  # epochs trained by this invocation
    epoch: int  # epochs completed in all
    best_top1: float
    best_epoch: int
    last_top1: float
    last_top5: float | None
    records: list[dict[str, Any]]  # this invocation's metrics records
    resumed_from: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "epochs_run": self.epochs_run, "epoch": self.epoch,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "last_top1": self.last_top1,
                "last_top5": self.last_top5, "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "config": self.config}


def _split_for_rank(ds: Any, info: DistInfo) -> Any:
    """Every world_size-th sample from this rank's offset: disjoint, no padding, so accuracy is exact."""
    if info.world_size == 1:
        return ds
    return Subset(ds, list(range(info.rank, len(ds), info.world_size)))


class Finetuner:
    """One ``tec-train finetune``: set up (fresh or resumed), train and evaluate per epoch. Use ``finetune()``."""

    def __init__(self, cfg: FinetuneConfig, reporter: FinetuneReporter | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.info = dist_info()
        self.device = resolve_device(cfg.device, self.info)
        self.amp = resolve_amp(cfg.amp, self.device)
        self.reporter = reporter if (reporter is not None and self.info.is_main) else FinetuneReporter()
        self.run_dir = Path(cfg.run_dir)
        self.resumed_from = latest_finetune_checkpoint(self.run_dir)
        self.resume = load_finetune_checkpoint(self.resumed_from) if self.resumed_from is not None else None
        if self.resume is not None:
            _check_options(self.resume["config"]["options"], cfg.to_json(), self.resumed_from)
            if self.resume["world_size"] != self.info.world_size:
                raise ResumeError(f"world size: the run in {self.run_dir} was started with {self.resume['world_size']} "
                                  f"processes, now {self.info.world_size}; its batch, lr and RNG states need the same")
        # Data and encoder are opened before any training work, so their errors come first too.
        self.weights = read_encoder_weights(Path(cfg.encoder_path), model=cfg.model, basemodel=cfg.basemodel,
                                            arch=cfg.arch, img_size=cfg.img_size)
        self.img_size = int(self.weights.config["img_size"])
        self.crop_pct = cfg.crop_pct if cfg.crop_pct is not None else DEFAULT_CROP_PCT[
            "image_folder" if cfg.data is not None else "fashion_mnist"]
        self.splits = self._open_data()
        self.eff_batch = cfg.batch_size * cfg.accum_iter * self.info.world_size
        per_rank = len(self.splits.train) // self.info.world_size  # type: ignore[arg-type]
        self.spe = per_rank // cfg.batch_size  # micro-batches per epoch (drop_last, as the reference)
        self.usable = self.spe // cfg.accum_iter * cfg.accum_iter
        if self.usable == 0:
            raise ValueError(f"--batch-size {cfg.batch_size} x --accum-iter {cfg.accum_iter}: more than the "
                             f"{per_rank} training images of each of {self.info.world_size} process(es)")

    def _open_data(self) -> LabelledSplits:
        cfg = self.cfg
        train_tf = finetune_train_transform(self.img_size, aa=cfg.aa, reprob=cfg.reprob)
        return open_labelled(data=Path(cfg.data) if cfg.data else None,
                             fashion_mnist_dir=Path(cfg.fashion_mnist) if cfg.fashion_mnist else None,
                             train_transform=train_tf, val_transform=eval_transform(self.img_size, self.crop_pct),
                             train_subset=cfg.train_subset, val_subset=cfg.val_subset, subset_seed=cfg.seed)

    # ---- setup --------------------------------------------------------------------------------
    def _setup(self) -> tuple[int, float, int]:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)  # same initial head on every rank (DDP would broadcast rank 0's anyway)
        self.net, model_facts = build_finetune_model(self.weights, self.splits.num_classes, global_pool=cfg.global_pool,
                                                     drop_path=cfg.drop_path, mlp_token=cfg.mlp_token)
        self.net.to(self.device)
        # Per-rank streams for augmentation and mixup, as the reference seeds with seed + rank.
        torch.manual_seed(cfg.seed + info.rank)
        np.random.seed((cfg.seed + info.rank) % 2**32)
        random.seed(cfg.seed + info.rank)
        self.loader_gen = torch.Generator().manual_seed(cfg.seed + info.rank)  # loader worker seeds
        self.peak_lr = cfg.lr if cfg.lr is not None else absolute_lr(cfg.blr, self.eff_batch)
        self.schedule = WarmupCosine(self.peak_lr, cfg.min_lr, min(cfg.warmup_epochs, cfg.epochs), cfg.epochs)
        self.optimizer = torch.optim.AdamW(param_groups_layer_decay(self.net, cfg.weight_decay, cfg.layer_decay),
                                           lr=self.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.mixup_fn = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                               num_classes=self.splits.num_classes) if cfg.mixup_active else None)
        if self.mixup_fn is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.resolved = {
            "world_size": info.world_size, "eff_batch": self.eff_batch, "lr": self.peak_lr,
            "warmup_epochs": self.schedule.warmup_epochs, "steps_per_epoch": self.spe,
            "optimizer_steps_per_epoch": self.usable // cfg.accum_iter, "amp": self.amp, "img_size": self.img_size,
            "crop_pct": self.crop_pct, "encoder": {**self.weights.facts, **self.weights.config}, "model": model_facts,
            "data": self.splits.facts, "classes": self.splits.classes,
            "trainable_params": sum(p.numel() for p in self.net.parameters() if p.requires_grad),
        }
        start_epoch, best, best_epoch = 0, -1.0, -1
        if self.resume is not None:
            ck = self.resume
            self.net.load_state_dict(ck["model"], strict=True)
            self.optimizer.load_state_dict(ck["optimizer"])
            if ck["scaler"] is not None:
                self.scaler.load_state_dict(ck["scaler"])
            restore_rng(ck["rng"][info.rank], self.loader_gen)
            start_epoch, best, best_epoch = ck["epoch"], ck["best_top1"], ck["best_epoch"]
            self.resume = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.owns_group = info.world_size > 1 and not (tdist.is_available() and tdist.is_initialized())
        self.distributed = init_process_group(info, self.device)
        self.model: Any = (DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                           if self.distributed else self.net)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
                         if self.amp != "off" else contextlib.nullcontext())
        pin = self.device.type == "cuda"
        self.sampler = DistributedSampler(self.splits.train, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=cfg.seed)
        self.train_loader = DataLoader(self.splits.train, batch_size=cfg.batch_size, sampler=self.sampler,
                                       num_workers=cfg.num_workers, pin_memory=pin, drop_last=True,
                                       generator=self.loader_gen, persistent_workers=False)
        self.val_loader = DataLoader(_split_for_rank(self.splits.val, info), batch_size=cfg.batch_size, shuffle=False,
                                     num_workers=cfg.num_workers, pin_memory=pin)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".finetune-*.pt.tmp-*"):
                stale.unlink(missing_ok=True)
            _truncate_metrics(self.run_dir / METRICS_NAME, start_epoch)
            write_json_atomic(self.run_dir / "config.json", {"options": cfg.to_json(), "resolved": self.resolved})
            if self.resumed_from is not None:
                self.reporter.message(f"resuming {self.resumed_from.name}: next epoch {start_epoch}, best top-1 {best:.4f}")
        return start_epoch, best, best_epoch

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            tdist.all_reduce(t)
        return t.tolist()

    # ---- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.set_epoch(epoch)
        loss_sum, n, lr = 0.0, 0, self.schedule(epoch)
        t0 = time.perf_counter()
        it = 0
        for images, target in self.train_loader:
            if it >= self.usable:
                break  # an incomplete last window is not run (its gradient would be discarded anyway)
            if it % cfg.accum_iter == 0:
                lr = self.schedule(it / self.spe + epoch)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
            images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
            target = target.to(self.device, non_blocking=True)  # [B]
            if self.mixup_fn is not None:
                images, target = self.mixup_fn(images, target)  # target [B, K] soft
            sync = (it + 1) % cfg.accum_iter == 0
            no_sync = self.model.no_sync() if (self.distributed and not sync) else contextlib.nullcontext()
            with no_sync:
                with self.autocast:
                    logits = self.model(images)  # [B, K]
                    loss = self.criterion(logits.float(), target)
                # Every rank learns of a non-finite loss on any rank, so none hangs in the next all-reduce.
                value, = self._all_sum([loss.item()])
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"non-finite loss {value} at epoch {epoch}, micro-batch {it}")
                self.scaler.scale(loss / cfg.accum_iter).backward()
            if sync:
                if cfg.clip_grad is not None:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += value / self.info.world_size
            n += 1
            it += 1
            fault_point("finetune_step")
            self.reporter.step(epoch, it)
        seconds = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(n, 1), "lr": lr, "train_seconds": seconds,
                "images_per_s": n * cfg.batch_size * self.info.world_size / max(seconds, 1e-12)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 and mean cross-entropy on the whole val set (split over ranks, summed exactly)."""
        self.net.eval()
        k = min(5, self.splits.num_classes)
        loss_sum = c1 = c5 = n = 0.0
        for images, target in self.val_loader:
            images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
            target = target.to(self.device, non_blocking=True)  # [B]
            with self.autocast:
                logits = self.net(images).float()  # [B, K]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            hits = logits.topk(k, dim=1).indices.eq(target[:, None])  # [B, k]
            c1 += float(hits[:, 0].sum())
            c5 += float(hits.any(dim=1).sum())
            n += len(target)
        loss_sum, c1, c5, n = self._all_sum([loss_sum, c1, c5, n])
        out = {"test_loss": loss_sum / n, "test_top1": c1 / n}
        if self.splits.num_classes >= 5:
            out["test_top5"] = c5 / n
        return out

    def _save(self, next_epoch: int, best: float, best_epoch: int) -> Path | None:
        rng = capture_rng(self.loader_gen)
        every: list[Any] = [None] * self.info.world_size
        if self.distributed:
            tdist.all_gather_object(every, rng)
        else:
            every = [rng]
        if not self.info.is_main:
            return None
        state = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "epoch": next_epoch,
                 "best_top1": best, "best_epoch": best_epoch, "rng": every, "world_size": self.info.world_size,
                 "config": {"options": self.cfg.to_json(), "resolved": self.resolved}}
        return save_finetune_checkpoint(self.run_dir, state, next_epoch, self.cfg.keep_last)

    def run(self) -> FinetuneResult:
        cfg = self.cfg
        records: list[dict[str, Any]] = []
        self.owns_group = False
        start_epoch = epoch = 0
        best, best_epoch = -1.0, -1
        try:
            start_epoch, best, best_epoch = self._setup()
            self.reporter.start(epochs=cfg.epochs, start_epoch=start_epoch, steps_per_epoch=self.usable,
                                summary=self.resolved)
            for epoch in range(start_epoch, cfg.epochs):
                train_stats = self._train_epoch(epoch)
                test = self.evaluate()
                if test["test_top1"] > best:
                    best, best_epoch = test["test_top1"], epoch
                record = {"epoch": epoch, **train_stats, **test, "best_top1": best, "best_epoch": best_epoch,
                          "time": time.time()}
                if self.info.is_main:
                    with open(self.run_dir / METRICS_NAME, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                records.append(record)
                self._save(epoch + 1, best, best_epoch)
                self.reporter.epoch_end(record)
            epoch = max(cfg.epochs, start_epoch)
        finally:
            self.reporter.finish()
            if self.owns_group:
                destroy_process_group()
        last = records[-1] if records else self._last_record()
        result = FinetuneResult(
            run_dir=self.run_dir, epochs_run=len(records), epoch=epoch, best_top1=best, best_epoch=best_epoch,
            last_top1=last.get("test_top1", float("nan")) if last else float("nan"),
            last_top5=last.get("test_top5") if last else None, records=records, resumed_from=self.resumed_from,
            config={"options": cfg.to_json(), "resolved": self.resolved},
        )
        if self.info.is_main:
            write_json_atomic(self.run_dir / RESULT_NAME, {k: v for k, v in result.to_json().items() if k != "config"})
        return result

    def _last_record(self) -> dict[str, Any] | None:
        """The newest stored record (a resumed run that had no epochs left to train)."""
        path = self.run_dir / METRICS_NAME
        if not path.is_file():
            return None
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None


def finetune(cfg: FinetuneConfig, *, reporter: FinetuneReporter | None = None) -> FinetuneResult:
    """Fine-tune (or resume the fine-tuning in ``cfg.run_dir``) and return the result."""
    return Finetuner(cfg, reporter).run()
