"""Spec 9.2 / 9.3 parity numbers for the TEC losses, and the wrong variants they must not match."""
from __future__ import annotations

import pytest
import torch

from tec_train.losses import attention_loss, feature_loss, normalize_feature_target

REL = 1e-6


def _close(value: float, expected: float, rel: float = REL) -> bool:
    return value == pytest.approx(expected, rel=rel)


@pytest.fixture
def feature_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target = torch.tensor([[[1.0, 0.0, 2.0], [2.0, 0.0, 0.0], [3.0, 1.0, 0.0], [4.0, 4.0, 1.0]]])  # [1, 4, 3]
    pred = torch.full_like(target, 0.5)  # [1, 4, 3]
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])  # [1, 4]
    return target, pred, mask


def _wrong_feature_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, variant: str) -> float:
    """The easy mistakes of method.md 8.3, written out so the test shows they give other numbers."""
    t = target.double()  # [B, L, D]
    if variant == "biased_var":
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    elif variant == "per_token":  # MAE's normalisation: over the channels of each token
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    else:  # "all_tokens": right normalisation, wrong average
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred.double() - t).pow(2).mean(-1)  # [B, L]
    if variant == "all_tokens":
        return per_patch.mean().item()
    return ((per_patch * mask).sum() / mask.sum()).item()


def test_feature_loss_reference_value(feature_case) -> None:
    target, pred, mask = feature_case
    assert _close(feature_loss(target, pred, mask).item(), 1.13607268)


def test_feature_target_normalised_along_tokens(feature_case) -> None:
    target, _, _ = feature_case
    first_col = normalize_feature_target(target)[0, :, 0]
    expected = torch.tensor([-1.16189, -0.38730, 0.38730, 1.16189])
    torch.testing.assert_close(first_col, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("variant", "wrong_value"),
    [("biased_var", 1.40032496), ("per_token", 0.91666619), ("all_tokens", 0.99999951)],
)
def test_feature_loss_wrong_variants_differ(feature_case, variant: str, wrong_value: float) -> None:
    target, pred, mask = feature_case
    assert _close(_wrong_feature_loss(target, pred, mask, variant), wrong_value)
    assert not _close(feature_loss(target, pred, mask).item(), wrong_value, rel=1e-3)


def test_feature_loss_ignores_visible_patches(feature_case) -> None:
    target, pred, mask = feature_case
    changed = pred.clone()
    changed[0, 1] = 100.0  # a visible patch (mask 0)
    assert feature_loss(target, changed, mask).item() == feature_loss(target, pred, mask).item()


def test_feature_loss_upcasts_fp16_targets(feature_case) -> None:
    target, pred, mask = feature_case
    loss = feature_loss(target.half(), pred, mask)
    assert loss.dtype == torch.float32
    assert _close(loss.item(), 1.13607268)


@pytest.fixture
def attention_case() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 3)  # [B, k+1, H, L]
    pred = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)  # [B, k+1, H, L]
    return target, pred


def test_attention_loss_reference_value(attention_case) -> None:
    target, pred = attention_case
    assert _close(attention_loss(target, pred, tau=1.8).item(), 1.47756891)


def test_attention_loss_is_not_tau_free_or_symmetric(attention_case) -> None:
    target, pred = attention_case
    ref = attention_loss(target, pred, tau=1.8).item()
    assert not _close(attention_loss(target, pred, tau=1.0).item(), ref, rel=1e-3)
    # The temperature applies to the target only: scaling the prediction by 1/tau changes the loss.
    assert not _close(attention_loss(target, pred / 1.8, tau=1.8).item(), ref, rel=1e-3)


def test_attention_loss_means_over_all_rows() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 4, 3, 5)  # [B, k+1, H, L]
    pred = torch.randn(2, 4, 3, 5)
    rows = [
        -(torch.softmax(target[b, j, h] / 1.4, -1) * torch.log_softmax(pred[b, j, h], -1)).sum()
        for b in range(2)
        for j in range(4)
        for h in range(3)
    ]
    expected = torch.stack(rows).mean()
    torch.testing.assert_close(attention_loss(target, pred, tau=1.4), expected)
