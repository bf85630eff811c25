"""End-to-end fine-tuning with the reference recipe (method.md 6, MAE's main_finetune), on timm parts.

Data flow: encoder source (encoder_weights.read_encoder_weights) --> timm ViT with a new head
(global-pool + fc_norm, or cls token + norm) --> labelled data (labelled.open_labelled) with
timm's RandAugment / random erasing and Mixup/CutMix --> AdamW with layer-wise lr decay,
per-iteration warm-up + cosine --> every epoch: evaluation, **metrics.jsonl**, an atomic
finetune-<epoch>.pt in the run dir (resumable, through the run harness ``harness``), and
result.json at the end. A larger --epochs on resume extends the run from its last epoch.

Runs alone or under torchrun (DDP: nccl on CUDA, gloo on CPU); bf16 autocast on CUDA only.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.layers import Mlp
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, DistributedSampler, Subset

from tec_cache.format.fs import write_json_atomic
from tec_cache.runtime.dist import DistInfo
from tec_cache.runtime.faults import fault_point
from tec_cache.runtime.workers import die_with_parent

from .augment import finetune_train_transform
from .encoder_weights import EncoderWeights, build_vit, input_normalisation, load_state_strict, read_encoder_weights
from .evaluate import eval_transform
from .finetune_config import MIXUP_MODES, MUTABLE_ON_RESUME, FinetuneConfig
from .harness import (
    FINETUNE,
    Reporter,
    Resume,
    RunKind,
    RunState,
    Runtime,
    agree_on_position,
    find_resume,
    open_run_dir,
    run_config,
    seed_rank,
)
from .harness.checkpoint_state import FinetuneCheckpoint
from .harness.errors import NonFiniteLossError, ResumeError
from .harness.reporting import last_metrics_record
from .harness.step import AccumulatingStep, MicroBatch, next_micro_batch
from .harness.trackers import MetricSinks, open_sinks
from .harness.writer import take_run_dir_for
from .labelled import DEFAULT_CROP_PCT, LabelledSplits, dataset_len, open_labelled
from .schedule import build_schedule
from .student_to_timm import CONFIG_KEYS

__all__ = ["MIXUP_MODES", "FINETUNE_RUN", "FinetuneConfig", "FinetuneResult", "FinetuneViT", "Finetuner", "NonFiniteLossError",
           "ResumeError", "build_finetune_model", "finetune", "layer_decay_scales",
           "layer_id_for_vit", "param_groups_layer_decay"]

RESULT_NAME = "result.json"

FINETUNE_RUN = RunKind(
    checkpoints=FINETUNE, label="fine-tuning run", mutable=MUTABLE_ON_RESUME, fresh_start="use a new --run-dir",
    world_size_needs="its batch, lr and RNG states need the same", progress_key="epoch",
)


# ---- model ------------------------------------------------------------------------------------
class FinetuneViT(VisionTransformer):
    """timm ViT with the reference's optional input adaptor: cls = cls_token_mlp(cls_token) (method.md 6)."""

    def __init__(self, *, mlp_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cls_token_mlp = (Mlp(self.embed_dim, hidden_features=4 * self.embed_dim, out_features=self.embed_dim)
                              if mlp_token else None)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token_mlp is None:
            return super()._pos_embed(x)
        pos = self.pos_embed
        assert pos is not None  # the adaptor is built for ViTs with a learnt pos_embed (TEC students)
        cls = self.cls_token_mlp(self.cls_token)  # [1, 1, C]
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1) + pos  # [B, 1+L, C]
        return self.pos_drop(x)


def build_finetune_model(weights: EncoderWeights, num_classes: int, *, global_pool: bool = True,
                         drop_path: float = 0.1, mlp_token: bool = True) -> tuple[VisionTransformer, dict[str, Any]]:
    """The classifier the reference fine-tunes, with ``weights`` loaded; returns (model, facts).

    avg mode drops the pretrained norm.* (global pool feeds a new fc_norm, as the reference);
    cls mode keeps it. The head is trunc_normal(std 2e-5) / 0 and pos_embed is frozen, as the
    reference re-creates it from the checkpoint without gradient. A timm/hub base keeps its own
    architecture (registers, pre-norm); its pretrained pooling head (attn_pool) goes in avg mode.
    """
    config, where = weights.config, weights.facts.get("basemodel") or weights.facts.get("path")
    if config.get("timm_source"):
        if global_pool and "dist_token" in weights.state:
            raise ValueError(f"--global-pool: {where} is a distilled DeiT, whose head reads its class and "
                             "distillation tokens; fine-tune it with --cls-token")
        if not global_pool and not config.get("class_token", True):
            raise ValueError(f"--cls-token: {where} is a ViT without a class token; fine-tune it with --global-pool")
    cls_mlp = weights.cls_mlp if mlp_token else None
    keep_mlp = cls_mlp is not None
    kwargs = dict(num_classes=num_classes, global_pool="avg" if global_pool else "token", drop_path_rate=drop_path)
    if cls_mlp is not None:
        model: VisionTransformer = FinetuneViT(mlp_token=True, **{k: weights.config[k] for k in CONFIG_KEYS}, **kwargs)
        state = {**weights.state, **cls_mlp}  # the raw cls token replaces the folded one
    else:
        model = build_vit(weights.config, **kwargs)
        state = dict(weights.state)
    if global_pool:
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "attn_pool."))}
    # The new parts: head and (avg mode) fc_norm keep their fresh values; everything else must load,
    # except norm.* of the reference's converted releases, which have none (method.md 5.3).
    new = ("head.", "head_dist.", "fc_norm.", *(("norm.",) if weights.facts.get("kind") == "reference" else ()))
    load_state_strict(model, state, str(weights.facts.get("path")), allow_missing=new)
    with torch.no_grad():
        for head in (model.head, getattr(model, "head_dist", None)):
            if isinstance(head, nn.Linear):
                nn.init.trunc_normal_(head.weight, std=2e-5)
                nn.init.zeros_(head.bias)
    if model.pos_embed is not None:  # a ViT without one (no_pos_embed) has nothing to freeze
        model.pos_embed.requires_grad_(False)
    return model, {"cls_mlp_kept": keep_mlp, "global_pool": global_pool, "num_classes": num_classes}


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The reference's layer id (method.md 6): patch_embed/pos_embed 0, blocks.j j+1, everything else num_layers.

    cls_token gets -1, which indexes the last scale (1.0): TEC's quirk, kept on purpose. A timm
    base's other input-side parts (register and distillation tokens, CLIP's pre-norm) are layer 0,
    as timm's own stem group.
    """
    if name == "cls_token":
        return -1
    if name in ("pos_embed", "reg_token", "dist_token") or name.startswith(("patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def _depth(model: nn.Module) -> int:
    """The number of transformer blocks of a timm ViT."""
    return len(list(model.get_submodule("blocks").children()))


def layer_decay_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale of every trainable parameter: layer_decay ** (num_layers - layer id), num_layers = depth + 1."""
    num_layers = _depth(model) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    return {n: scales[layer_id_for_vit(n, num_layers)] for n, p in model.named_parameters() if p.requires_grad}


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as the reference's param_groups_lrd: (layer, decay) groups with an ``lr_scale``.

    No weight decay for 1-D parameters and timm's no_weight_decay set (pos_embed, cls_token).
    """
    no_weight_decay = getattr(model, "no_weight_decay", None)
    skip = set(no_weight_decay()) if no_weight_decay is not None else set()
    num_layers = _depth(model) + 1
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


# ---- the run ------------------------------------------------------------------------------------
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


def _non_finite(where: str, values: dict[str, float]) -> str | None:
    return None if math.isfinite(values["loss"]) else f"non-finite loss {values['loss']} at {where}"


def _split_for_rank(ds: Any, info: DistInfo) -> Any:
    """Every world_size-th sample from this rank's offset: disjoint, no padding, so accuracy is exact."""
    if info.world_size == 1:
        return ds
    return Subset(ds, list(range(info.rank, len(ds), info.world_size)))


class Finetuner:
    """One ``tec-train finetune``: set up (fresh or resumed), train and evaluate per epoch. Use ``finetune()``."""

    def __init__(self, cfg: FinetuneConfig, reporter: Reporter | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.runtime = Runtime(cfg.run.device, cfg.run.amp)
        self.info, self.device, self.amp = self.runtime.info, self.runtime.device, self.runtime.amp
        self.reporter = reporter if (reporter is not None and self.info.is_main) else Reporter()
        self.run_dir = Path(cfg.run_dir)
        self.sinks = MetricSinks(self.run_dir)  # rank 0 opens its trackers in _setup
        # One writer per run dir, taken before anything is read from it or written to it.
        self.lock = take_run_dir_for(self.runtime, self.run_dir, "tec-train finetune", self.reporter.message,
                                     lambda: self._prepare(cfg))

    def _prepare(self, cfg: FinetuneConfig) -> None:
        self.resume: Resume | None = find_resume(self.run_dir, FINETUNE_RUN, cfg.to_json(), self.info.world_size,
                                                 self.reporter.message)
        self.resumed_from = self.resume.path if self.resume is not None else None
        # Data and encoder are opened before any training work, so their errors come first too.
        self.weights = read_encoder_weights(cfg.encoder.path, model=cfg.encoder.model, basemodel=cfg.encoder.basemodel,
                                            arch=cfg.encoder.arch, img_size=cfg.classifier.img_size)
        self.img_size = int(self.weights.config["img_size"])
        self.crop_pct = cfg.labelled.crop_pct if cfg.labelled.crop_pct is not None else DEFAULT_CROP_PCT[
            "image_folder" if cfg.labelled.data is not None else "fashion_mnist"]
        self.splits = self._open_data()
        self.eff_batch = cfg.optim.batch_size * cfg.optim.accum_iter * self.info.world_size
        per_rank = dataset_len(self.splits.train) // self.info.world_size
        self.micro_batches_per_epoch = per_rank // cfg.optim.batch_size  # drop_last, as the reference
        # An incomplete last accumulation window is not run (its gradient would be discarded anyway).
        self.micro_batches_run_per_epoch = self.micro_batches_per_epoch // cfg.optim.accum_iter * cfg.optim.accum_iter
        if self.micro_batches_run_per_epoch == 0:
            raise ValueError(f"--batch-size {cfg.optim.batch_size} x --accum-iter {cfg.optim.accum_iter}: more than the "
                             f"{per_rank} training images of each of {self.info.world_size} process(es)")
        self.extended: list[dict[str, int]] = []

    def _open_data(self) -> LabelledSplits:
        cfg = self.cfg
        # A timm/hub base sees its own normalisation (CLIP's is not ImageNet's); every other source ImageNet's.
        mean, std = input_normalisation({**self.weights.facts, **self.weights.config})
        train_tf = finetune_train_transform(self.img_size, aa=cfg.augment.aa, reprob=cfg.augment.reprob, mean=mean, std=std)
        return open_labelled(data=Path(cfg.labelled.data) if cfg.labelled.data else None,
                             fashion_mnist_dir=Path(cfg.labelled.fashion_mnist) if cfg.labelled.fashion_mnist else None,
                             train_transform=train_tf, val_transform=eval_transform(self.img_size, self.crop_pct, mean, std),
                             train_subset=cfg.labelled.train_subset, val_subset=cfg.labelled.val_subset, subset_seed=cfg.optim.seed)

    # ---- setup --------------------------------------------------------------------------------
    def _setup(self) -> tuple[int, float, int]:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.optim.seed)  # same initial head on every rank (DDP would broadcast rank 0's anyway)
        self.net, model_facts = build_finetune_model(self.weights, self.splits.num_classes, global_pool=cfg.classifier.global_pool,
                                                     drop_path=cfg.classifier.drop_path, mlp_token=cfg.encoder.mlp_token)
        self.net.to(self.device)
        # Per-rank streams for augmentation and mixup, as the reference seeds with seed + rank.
        seed_rank(cfg.optim.seed, info.rank)
        self.loader_gen = torch.Generator().manual_seed(cfg.optim.seed + info.rank)  # loader worker seeds
        self.schedule = build_schedule(cfg.optim, self.eff_batch)
        self.peak_lr = self.schedule.lr
        self.optimizer = torch.optim.AdamW(param_groups_layer_decay(self.net, cfg.optim.weight_decay, cfg.optim.layer_decay),
                                           lr=self.peak_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        self.state = RunState(self.net, self.optimizer, self.scaler, self.loader_gen)
        self.mixup_fn = (Mixup(mixup_alpha=cfg.augment.mixup, cutmix_alpha=cfg.augment.cutmix, prob=cfg.augment.mixup_prob,
                               switch_prob=cfg.augment.mixup_switch_prob, mode=cfg.augment.mixup_mode, label_smoothing=cfg.augment.smoothing,
                               num_classes=self.splits.num_classes) if cfg.augment.mixup_active else None)
        if self.mixup_fn is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()  # smoothing is inside the mixed targets
        elif cfg.augment.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=cfg.augment.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.steps_per_epoch = steps_per_epoch = self.micro_batches_run_per_epoch // cfg.optim.accum_iter
        self.resolved = {
            "world_size": info.world_size, "eff_batch": self.eff_batch, "lr": self.peak_lr,
            "warmup_epochs": self.schedule.warmup_epochs, "steps_per_epoch": self.micro_batches_per_epoch,
            "optimizer_steps_per_epoch": steps_per_epoch, "amp": self.amp, "img_size": self.img_size,
            "crop_pct": self.crop_pct, "encoder": {**self.weights.facts, **self.weights.config}, "model": model_facts,
            "data": self.splits.facts, "classes": self.splits.classes,
            "trainable_params": sum(p.numel() for p in self.net.parameters() if p.requires_grad),
        }
        start_epoch, best, best_epoch = 0, -1.0, -1
        if self.resume is not None:
            ck = self.resume.state(FinetuneCheckpoint)
            self.state.restore(ck, info.rank)
            start_epoch, best, best_epoch = ck.epoch, ck.best_top1, ck.best_epoch
            self.extended = self.resume.history(start_epoch * steps_per_epoch, start_epoch)
            self.resume.release()
        self.runtime.join()
        agree_on_position(self.runtime, start_epoch, "epochs")
        self.model: Any = self.runtime.wrap(self.net)
        self.step = AccumulatingStep(runtime=self.runtime, module=self.net, ddp=self.model if self.runtime.distributed else None,
                                     optimizer=self.optimizer, scaler=self.scaler, schedule=self.schedule,
                                     accum_iter=cfg.optim.accum_iter, clip_grad=cfg.optim.clip_grad, non_finite=_non_finite)
        pin = self.device.type == "cuda"
        self.sampler: DistributedSampler[Any] = DistributedSampler(self.splits.train, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=cfg.optim.seed)
        self.train_loader = DataLoader(self.splits.train, batch_size=cfg.optim.batch_size, sampler=self.sampler,
                                       num_workers=cfg.labelled.num_workers, pin_memory=pin, drop_last=True,
                                       generator=self.loader_gen, persistent_workers=False,
                                       worker_init_fn=die_with_parent())
        self.val_loader = DataLoader(_split_for_rank(self.splits.val, info), batch_size=cfg.optim.batch_size, shuffle=False,
                                     num_workers=cfg.labelled.num_workers, pin_memory=pin, worker_init_fn=die_with_parent())
        if info.is_main:
            # A checkpoint before epoch E has seen the records of epochs up to E - 1.
            open_run_dir(self.run_dir, FINETUNE_RUN, start_epoch - 1, self._config())
            self.sinks = open_sinks(self.run_dir, kept_step=start_epoch * steps_per_epoch, tensorboard=cfg.run.tensorboard,
                                    wandb_project=cfg.run.wandb, config=self._config(), notice=self.reporter.message)
            if self.resume is not None:
                self.reporter.message(f"resuming {self.resume.path.name}: next epoch {start_epoch}, best top-1 {best:.4f}")
                if self.resume.extension is not None:
                    self.reporter.message(self.resume.extension.notice(start_epoch * steps_per_epoch, start_epoch))
        return start_epoch, best, best_epoch

    def _config(self) -> dict[str, Any]:
        return run_config(self.cfg.to_json(), self.resolved, self.extended)

    # ---- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        accum, world = cfg.optim.accum_iter, self.info.world_size
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler.set_epoch(epoch)
        loss_sum, n, lr = 0.0, 0, self.schedule(epoch)
        t0 = time.perf_counter()
        wait = [0.0]
        batches = iter(self.train_loader)
        # Whole windows only: an incomplete last one is not run (its gradient would be discarded anyway).
        for window in range(self.steps_per_epoch):
            it = window * accum
            lr, values = self.step(it / self.micro_batches_per_epoch + epoch, self._window(batches, epoch, it, wait))
            for named in values:
                loss_sum += named["loss"] / world
                n += 1
            if (window + 1) % cfg.run.log_every == 0:
                spent = time.perf_counter() - t0
                self.reporter.status(epoch * self.micro_batches_run_per_epoch + it + accum, {
                    "step": epoch * self.steps_per_epoch + window + 1, "epoch": epoch,
                    "train_loss": loss_sum / n, "lr": lr,
                    "images_per_s": n * cfg.optim.batch_size * world / max(spent, 1e-12),
                    "data_wait_fraction": wait[0] / max(spent, 1e-12)})
        # The loader is asked for one batch past the last window, as it always was: with in-process
        # loading that draws the augmentation of a batch, and the RNG states checkpointed after the epoch
        # (which resumed runs continue from) include those draws.
        tw = time.perf_counter()
        next(batches, None)
        wait[0] += time.perf_counter() - tw
        seconds = time.perf_counter() - t0
        return {"train_loss": loss_sum / max(n, 1), "lr": lr, "train_seconds": seconds,
                "images_per_s": n * cfg.optim.batch_size * world / max(seconds, 1e-12),
                "data_wait_fraction": wait[0] / max(seconds, 1e-12)}

    def _window(self, batches: Iterator[Any], epoch: int, it: int, wait: list[float]) -> Iterator[MicroBatch]:
        """The micro-batches of one window, from micro-batch ``it`` of ``epoch`` on, on the device and
        mixed; the time spent waiting for data goes to ``wait[0]``."""
        for j in range(self.cfg.optim.accum_iter):
            images, target = next_micro_batch(batches, wait, "the training data", epoch, it + j, self.micro_batches_per_epoch)
            images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
            target = target.to(self.device, non_blocking=True)  # [B]
            if self.mixup_fn is not None:
                images, target = self.mixup_fn(images, target)  # target [B, K] soft
            yield MicroBatch(partial(self._loss, images, target), self._summed, f"epoch {epoch}, micro-batch {it + j}")
            fault_point("finetune_step")
            self.reporter.advance(epoch * self.micro_batches_run_per_epoch + it + j + 1)

    def _loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)  # [B, K]
        return self.criterion(logits.float(), target)

    def _summed(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss and its sum over ranks."""
        value, = self.runtime.all_sum([loss.item()])
        return loss, {"loss": value}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1/top-5 and mean cross-entropy on the whole val set (split over ranks, summed exactly)."""
        self.net.eval()
        k = min(5, self.splits.num_classes)
        loss_sum = c1 = c5 = n = 0.0
        for images, target in self.val_loader:
            images = images.to(self.device, non_blocking=True)  # [B, 3, S, S]
            target = target.to(self.device, non_blocking=True)  # [B]
            with self.runtime.autocast():
                logits = self.net(images).float()  # [B, K]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            hits = logits.topk(k, dim=1).indices.eq(target[:, None])  # [B, k]
            c1 += float(hits[:, 0].sum())
            c5 += float(hits.any(dim=1).sum())
            n += len(target)
        loss_sum, c1, c5, n = self.runtime.all_sum([loss_sum, c1, c5, n])
        out = {"test_loss": loss_sum / n, "test_top1": c1 / n}
        if self.splits.num_classes >= 5:
            out["test_top5"] = c5 / n
        return out

    def _save(self, next_epoch: int, best: float, best_epoch: int) -> Path | None:
        position = {"epoch": next_epoch, "best_top1": best, "best_epoch": best_epoch, "config": self._config()}
        self.lock.ensure()
        return self.state.save(self.runtime, self.run_dir, FINETUNE_RUN, next_epoch, self.cfg.run.keep_last, position)

    def run(self) -> FinetuneResult:
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> FinetuneResult:
        cfg = self.cfg
        records: list[dict[str, Any]] = []
        start_epoch = epoch = 0
        best, best_epoch = -1.0, -1
        try:
            start_epoch, best, best_epoch = self._setup()
            self.reporter.start(total=cfg.optim.epochs * self.micro_batches_run_per_epoch,
                                done=start_epoch * self.micro_batches_run_per_epoch, summary=self.resolved)
            for epoch in range(start_epoch, cfg.optim.epochs):
                train_stats = self._train_epoch(epoch)
                test = self.evaluate()
                if test["test_top1"] > best:
                    best, best_epoch = test["test_top1"], epoch
                # step: the optimizer steps done by the end of the epoch, the x of the TensorBoard and W&B curves.
                record = {"step": (epoch + 1) * self.steps_per_epoch, "epoch": epoch, **train_stats, **test,
                          "best_top1": best, "best_epoch": best_epoch, "time": time.time()}
                if self.info.is_main:
                    self.sinks.write(record)
                records.append(record)
                self._save(epoch + 1, best, best_epoch)
                self.reporter.record(record)
            epoch = max(cfg.optim.epochs, start_epoch)
        finally:
            self.sinks.close()
            self.lock.ending()
            self.reporter.finish()
            self.runtime.leave()
        # A resumed run with no epochs left reports the newest stored record.
        last = records[-1] if records else last_metrics_record(self.run_dir)
        result = FinetuneResult(
            run_dir=self.run_dir, epochs_run=len(records), epoch=epoch, best_top1=best, best_epoch=best_epoch,
            last_top1=last.get("test_top1", float("nan")) if last else float("nan"),
            last_top5=last.get("test_top5") if last else None, records=records, resumed_from=self.resumed_from,
            config=self._config(),
        )
        if self.info.is_main:
            write_json_atomic(self.run_dir / RESULT_NAME, {k: v for k, v in result.to_json().items() if k != "config"})
        return result


def finetune(cfg: FinetuneConfig, *, reporter: Reporter | None = None) -> FinetuneResult:
    """Fine-tune (or resume the fine-tuning in ``cfg.run_dir``) and return the result."""
    return Finetuner(cfg, reporter).run()
