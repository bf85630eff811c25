"""TEC pretraining losses (method.md 3.8).

Data flow: cache -> loader -> student + adapter -> **losses** -> step. Both functions take the
cached targets as they come out of the loader (possibly fp16) and compute in float32, so the
result does not depend on the codec's storage dtype or on autocast.

Shapes in this project: the cached attention target has no singleton layer axis, so attention
targets and predictions are [B, k+1, H, L].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FEATURE_TARGET_EPS = 1e-6


def normalize_feature_target(target: torch.Tensor) -> torch.Tensor:
    """Normalise each image's target per channel over the token axis (dim 1), unbiased variance.

    This is TEC's patch-axis normalisation, not MAE's per-token one; the eps is added to the
    variance, not to the standard deviation (method.md 8.3).
    """
    target = target.float()  # [B, L, D]
    mean = target.mean(dim=1, keepdim=True)  # [B, 1, D]
    var = target.var(dim=1, unbiased=True, keepdim=True)  # [B, 1, D]
    return (target - mean) / torch.sqrt(var + FEATURE_TARGET_EPS)  # [B, L, D]


def feature_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error against the normalised target, averaged over masked patches only.

    target, pred: [B, L, D]; mask: [B, L] with 1 = masked (enters the loss), 0 = visible.
    """
    per_patch = (pred.float() - normalize_feature_target(target)).pow(2).mean(dim=-1)  # [B, L]
    mask = mask.float()  # [B, L]
    return (per_patch * mask).sum() / mask.sum()


def attention_loss(target: torch.Tensor, pred: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft cross-entropy over patch keys between softmax(target / tau) and log_softmax(pred).

    target, pred: [B, k+1, H, L] (cls key column already dropped, so both distributions are over
    patch keys only). Averaged over every (image, query row, head); the mask is deliberately not
    used, as in the reference (method.md 8.4).
    """
    p = F.softmax(target.float() / tau, dim=-1)  # [B, k+1, H, L]
    log_q = F.log_softmax(pred.float(), dim=-1)  # [B, k+1, H, L]
    return -(p * log_q).sum(dim=-1).mean()
