"""Frozen-feature evaluation: feature extraction, weighted kNN (DINO) and a linear probe (MAE).

Data flow: encoder_weights.load_encoder --> timm ViT (frozen) + labelled.open_labelled --> **eval
transform --> features [N, C]** --> knn_classify | linear_probe --> top-1 / top-5 (fractions in
[0, 1]). The probe trains on precomputed features, so it costs seconds, not encoder forwards.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tec_cache.runtime.workers import die_with_parent

from .eval_config import POOLS, PROBE_OPTIMIZERS, EvalConfig
from .labelled import Transformed

_DEFAULTS = EvalConfig()  # the library functions' defaults are the options' defaults


def eval_transform(img_size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                   std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Callable:
    """The reference's eval transform: bicubic resize of the shorter side to img_size / crop_pct,
    centre crop img_size, ImageNet mean/std (method.md 6: 256 -> 224 at crop_pct 0.875); a timm/hub
    base passes its own ``mean``/``std``."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"--crop-pct: must be in (0, 1], got {crop_pct}")
    return T.Compose([
        T.Resize(int(img_size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(tuple(mean), tuple(std)),
    ])


def model_img_size(model: nn.Module) -> int:
    size: Any = model.get_submodule("patch_embed").img_size  # timm keeps (H, W); a plain int elsewhere
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def pool_features(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """[B, P+L, C] final-normed tokens -> [B, C]: mean of the L patch tokens (the P prefix tokens:
    cls, registers, DeiT's distillation token, left out), or the cls token (the first)."""
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)  # [B, C]
    if pool == "cls":
        return tokens[:, 0]  # [B, C]
    raise ValueError(f"--pool: expected one of {', '.join(POOLS)}, got {pool!r}")


def check_pool(model: nn.Module, pool: str, label: str = "the encoder") -> None:
    """``--pool cls`` needs a class token; ValueError names ``label`` and why otherwise."""
    if pool == "cls" and not getattr(model, "has_class_token", True):
        raise ValueError(f"--pool cls: {label} is a ViT without a class token (its own pooling is "
                         f"{getattr(model, 'global_pool', '?')!r}), so there is no cls token to take; use --pool avg")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 4,
    device: torch.device | str = "cpu",
    pool: str = "avg",
    crop_pct: float = 0.875,
    transform: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, C] on the CPU, labels int64 [N]) of a (PIL image, label) dataset.

    The images get ``eval_transform(model's img_size, crop_pct)`` unless ``transform`` is given.
    The model runs in eval mode (timm ``forward_features``, final norm included); on CUDA under
    bf16 autocast, the features are returned in float32.
    """
    if pool not in POOLS:
        raise ValueError(f"--pool: expected one of {', '.join(POOLS)}, got {pool!r}")
    check_pool(model, pool)
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be a positive integer, got {batch_size}")
    device = torch.device(device)
    tf = transform if transform is not None else eval_transform(model_img_size(model), crop_pct)
    loader = DataLoader(Transformed(dataset, tf), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False, worker_init_fn=die_with_parent())
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    was_training = model.training
    model.eval().to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # timm's ViTs and the students all have forward_features; nn.Module's attribute typing cannot say so.
    forward_features = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)
    feats, labels = [], []
    try:
        for images, target in loader:
            with amp:
                tokens = forward_features(images.to(device, non_blocking=True))  # [B, P+L, C]
            feats.append(pool_features(tokens.float(), pool, num_prefix).cpu())  # [B, C]
            labels.append(torch.as_tensor(target, dtype=torch.int64))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the dataset is empty")
    return torch.cat(feats), torch.cat(labels)


def _accuracies(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[int, int]:
    """(# top-1 correct, # top-5 correct) of class scores [B, K] against labels [B]."""
    k = min(5, num_classes)
    top = scores.topk(k, dim=1).indices  # [B, k]
    hits = top.eq(labels.view(-1, 1))  # [B, k]
    return int(hits[:, :1].sum()), int(hits.any(dim=1).sum())


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = _DEFAULTS.k,
    temperature: float = _DEFAULTS.temperature,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity (the DINO protocol).

    Each test feature votes with its ``k`` most similar train features, each vote weighted by
    exp(similarity / temperature). Returns top-1 (and top-5 when there are >= 5 classes) as
    fractions; the test set goes through in chunks so memory stays [chunk, N_train].
    """
    if k < 1:
        raise ValueError(f"--k: must be a positive integer, got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature: must be a positive number, got {temperature}")
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, C] with equal C, got {list(train_feats.shape)} and {list(test_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels differ in length")
    train_labels, test_labels = train_labels.long(), test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    train_n = F.normalize(train_feats.float(), dim=1)  # [N, C]
    test_n = F.normalize(test_feats.float(), dim=1)  # [M, C]
    top1 = top5 = 0
    for start in range(0, len(test_n), chunk_size):
        q = test_n[start:start + chunk_size]  # [b, C]
        sim = q @ train_n.T  # [b, N]
        weights, idx = sim.topk(k, dim=1)  # [b, k]
        neighbours = train_labels[idx]  # [b, k]
        votes = torch.zeros(len(q), num_classes)  # [b, K]
        votes.scatter_add_(1, neighbours, (weights / temperature).exp())
        c1, c5 = _accuracies(votes, test_labels[start:start + chunk_size], num_classes)
        top1, top5 = top1 + c1, top5 + c5
    out: dict[str, Any] = {"top1": top1 / len(test_n), "k": k, "temperature": temperature,
                           "num_train": len(train_n), "num_test": len(test_n), "num_classes": num_classes}
    if num_classes >= 5:
        out["top5"] = top5 / len(test_n)
    return out


class Lars(torch.optim.Optimizer):
    """LARS as in MAE's util/lars.py: weight decay and the trust ratio apply to >1-D tensors only.

    (timm's Lars skips the adaptation when weight decay is 0, which the probe uses.)
    """

    def __init__(self, params: Any, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]  # no closure form: the probe never passes one
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


@contextlib.contextmanager
def _single_thread() -> Any:
    """One intra-op thread: the probe's [batch, C] x [C, K] steps are too small to split, and on a
    busy machine extra threads spin more than they compute (10x slower measured on 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = _DEFAULTS.epochs,
    lr: float | None = None,
    batch_size: int = _DEFAULTS.batch_size,
    weight_decay: float = _DEFAULTS.weight_decay,
    seed: int = 0,
    warmup_epochs: float = _DEFAULTS.warmup_epochs,
    optimizer: str = _DEFAULTS.optimizer,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Linear classifier on frozen features, MAE's probe: BatchNorm1d(affine=False) -> Linear.

    The head starts at trunc_normal(std 0.01) / 0; SGD with momentum 0.9 (or ``optimizer="lars"``,
    MAE's LARS, which only pays off at MAE's 16384 batch: at batch 256 its trust ratio leaves the
    probe far under-trained) with ``lr`` (default blr 0.1 x batch / 256), linear warm-up then
    cosine to 0 per iteration. Trained on the given features (no augmentation, unlike MAE's
    probe), on the CPU; the same seed gives the same result. Returns best and last test top-1
    (fractions) and the per-epoch curve.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be positive integers, got {epochs} and {batch_size}")
    if optimizer not in PROBE_OPTIMIZERS:
        raise ValueError(f"--optimizer: expected one of {', '.join(PROBE_OPTIMIZERS)}, got {optimizer!r}")
    if lr is None:
        lr = 0.1 * batch_size / 256
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr: must be a positive number, got {lr}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"--weight-decay: must be a number >= 0, got {weight_decay}")
    with _single_thread():
        return _linear_probe(train_feats, train_labels, test_feats, test_labels, epochs=epochs, lr=lr,
                             batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                             warmup_epochs=warmup_epochs, optimizer=optimizer, num_classes=num_classes)


def _linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                  test_labels: torch.Tensor, *, epochs: int, lr: float, batch_size: int, weight_decay: float,
                  seed: int, warmup_epochs: float, optimizer: str, num_classes: int | None) -> dict[str, Any]:
    x_train, x_test = train_feats.float().cpu(), test_feats.float().cpu()  # [N, C], [M, C]
    y_train, y_test = train_labels.long().cpu(), test_labels.long().cpu()
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.01, generator=gen)
        head.bias.zero_()
    probe = nn.Sequential(nn.BatchNorm1d(x_train.shape[1], affine=False, eps=1e-6), head)
    opt: torch.optim.Optimizer = (Lars(probe.parameters(), lr=lr, weight_decay=weight_decay) if optimizer == "lars"
                                  else torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay))
    n = len(x_train)
    # drop_last as MAE's loader, unless the set is smaller than one batch (BatchNorm needs > 1 sample).
    steps = max(n // batch_size, 1)
    bs = min(batch_size, n)
    total = epochs * steps
    warm = min(warmup_epochs, epochs) * steps
    curve: list[dict[str, Any]] = []
    best = -1.0
    step = 0
    for epoch in range(epochs):
        probe.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum = 0.0
        for i in range(steps):
            cur = lr * step / warm if step < warm else lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
            for g in opt.param_groups:
                g["lr"] = cur
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(probe(x_train[idx]), y_train[idx])  # logits [bs, K]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            step += 1
        probe.eval()
        with torch.no_grad():
            top1, top5 = _accuracies(probe(x_test), y_test, num_classes)  # logits [M, K]
        acc = top1 / len(x_test)
        best = max(best, acc)
        rec = {"epoch": epoch, "train_loss": loss_sum / steps, "top1": acc}
        if num_classes >= 5:
            rec["top5"] = top5 / len(x_test)
        curve.append(rec)
    return {"best_top1": best, "last_top1": curve[-1]["top1"], "last_top5": curve[-1].get("top5"),
            "epochs": epochs, "lr": lr, "batch_size": bs, "weight_decay": weight_decay, "optimizer": optimizer,
            "seed": seed, "num_train": n, "num_test": len(x_test), "num_classes": num_classes, "curve": curve}



# ---- the knn and linear commands as library calls ------------------------------------------------


@dataclass
class FrozenFeatures:
    """(features [N, C], labels [N]) of both splits, and what produced them (JSON-able)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    meta: dict[str, Any]


def frozen_features(cfg: EvalConfig, busy: Callable[[str], AbstractContextManager] | None = None) -> FrozenFeatures:
    """Load the encoder and the data ``cfg`` names and extract both splits' features.

    Every option is checked (ValueError / FileNotFoundError naming it) before any image is read;
    ``busy(text)`` is a context shown while the features are computed (a spinner in the CLI).
    """
    from tec_cache.runtime.dist import dist_info, resolve_device

    from .encoder_weights import input_normalisation, load_encoder
    from .labelled import open_labelled

    cfg.validate()
    dev = resolve_device(cfg.device, dist_info())
    splits = open_labelled(data=Path(cfg.data) if cfg.data else None,
                           fashion_mnist_dir=Path(cfg.fashion_mnist) if cfg.fashion_mnist else None,
                           train_subset=cfg.train_subset, val_subset=cfg.val_subset, subset_seed=cfg.seed)
    crop = cfg.crop_pct if cfg.crop_pct is not None else splits.default_crop_pct
    encoder, facts = load_encoder(cfg.source, model=cfg.model, basemodel=cfg.basemodel, arch=cfg.arch,
                                  img_size=cfg.img_size, patch_size=cfg.patch_size, depth=cfg.depth)
    check_pool(encoder, cfg.pool, str(facts.get("basemodel") or facts.get("path")))
    # A timm/hub base sees its own normalisation (CLIP's is not ImageNet's); every other source ImageNet's.
    mean, std = input_normalisation(facts)
    tf = eval_transform(model_img_size(encoder), crop, mean, std)
    with busy("extracting features") if busy is not None else contextlib.nullcontext():
        extract = partial(extract_features, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=dev,
                          pool=cfg.pool, crop_pct=crop, transform=tf)
        train = extract(encoder, splits.train)
        val = extract(encoder, splits.val)
    meta = {"encoder": facts, "data": splits.facts, "pool": cfg.pool, "crop_pct": crop, "num_classes": splits.num_classes}
    return FrozenFeatures(train, val, meta)


def run_knn(cfg: EvalConfig, busy: Callable[[str], AbstractContextManager] | None = None) -> dict[str, Any]:
    """``tec-train knn``: {"knn": result, encoder/data facts} for the encoder and data ``cfg`` names."""
    f = frozen_features(cfg, busy)
    res = knn_classify(f.train[0], f.train[1], f.val[0], f.val[1], k=cfg.k, temperature=cfg.temperature,
                       num_classes=f.meta["num_classes"])
    return {"knn": res, **f.meta}


def run_linear(cfg: EvalConfig, busy: Callable[[str], AbstractContextManager] | None = None) -> dict[str, Any]:
    """``tec-train linear``: {"linear": result with its curve, encoder/data facts}."""
    f = frozen_features(cfg, busy)
    with busy("training the probe") if busy is not None else contextlib.nullcontext():
        res = linear_probe(f.train[0], f.train[1], f.val[0], f.val[1], epochs=cfg.epochs, lr=cfg.lr,
                           batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=cfg.seed,
                           warmup_epochs=cfg.warmup_epochs, optimizer=cfg.optimizer, num_classes=f.meta["num_classes"])
    return {"linear": res, **f.meta}
