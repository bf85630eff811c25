"""Teacher targets against an independent hook-based computation on a stock timm ViT (method.md 9.4)."""
from __future__ import annotations

import pytest
import timm
import torch

from tec_cache.core.targets import extract_targets, normalise_images


def _reference(model, images, topk, last_layers):
    """Forward hooks on block outputs and the last block's norm1 input; logits by hand from the
    qkv weights (rows [q; k; v], heads contiguous), scale head_dim^-0.5."""
    outs, norm_in = {}, {}
    depth = len(model.blocks)
    hooks = [model.blocks[i].register_forward_hook(lambda m, i, o, n=i: outs.__setitem__(n, o)) for i in range(depth)]
    hooks.append(model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: norm_in.__setitem__("x", o)))
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    feat = sum(outs[i][:, 1:] for i in range(depth - last_layers, depth)) / last_layers
    x = norm_in["x"]  # [B,N,C]
    attn = model.blocks[-1].attn
    H = attn.num_heads
    B, N, C = x.shape
    hd = C // H
    w, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ w[:C].T + b[:C]).view(B, N, H, hd).transpose(1, 2)
    k = (x @ w[C:2 * C].T + b[C:2 * C]).view(B, N, H, hd).transpose(1, 2)
    A = (q @ k.transpose(-1, -2)) * hd ** -0.5  # [B,H,N,N]
    idx = torch.topk(A[:, :, 0, 1:].mean(1), topk, dim=1).indices
    rows = torch.cat([A[:, :, :1], torch.stack([A[b_, :, 1 + idx[b_]] for b_ in range(B)])], dim=2)  # [B,H,k+1,N]
    att = rows.permute(0, 2, 1, 3)[..., 1:]
    return feat, att, idx


@pytest.mark.parametrize("last_layers", [1, 2, 3])
def test_targets_match_hook_reference(last_layers):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4).eval()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    images = torch.randn(3, 3, 32, 32)
    feat, att, idx = extract_targets(model, images, topk=5, last_layers=last_layers)
    rf, ra, ri = _reference(model, images, 5, last_layers)
    assert feat.shape == (3, 64, 192) and att.shape == (3, 6, 3, 64) and idx.shape == (3, 5)
    assert idx.dtype == torch.int64 and int(idx.max()) < 64
    torch.testing.assert_close(feat, rf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att, ra, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ri)


def test_vit_b_shapes_and_order():
    """Spec 9.4 shapes for ViT-B/16 at 224 with k=15; rows are in top-k order."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    images = torch.randn(1, 3, 224, 224)
    feat, att, idx = extract_targets(model, images, topk=15, last_layers=2)
    assert feat.shape == (1, 196, 768) and att.shape == (1, 16, 12, 196) and idx.shape == (1, 15)
    score = att[:, 0].mean(1)  # head-mean of the cls row = the ranking score
    assert torch.equal(idx, torch.topk(score, 15, dim=1).indices)
    assert bool((score.gather(1, idx)[:, :-1] >= score.gather(1, idx)[:, 1:]).all())


def test_normalise_images_matches_to_tensor_normalize():
    from torchvision.transforms import functional as TF

    px = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = torch.stack([TF.normalize(p.float() / 255, mean, std) for p in px])
    torch.testing.assert_close(normalise_images(px, mean, std), want)
