"""Patch-relation enhanced targets from a frozen base ViT (method.md 2.3).

Data flow: normalised view batch --> base model forward --> (feature target, attention-logit rows,
top-k indices) --> codec. Stage 2's online mode calls the same function inside its step.

Every block runs as timm built it (fused SDPA where timm uses it). The attention target needs
logits, which fused attention never materialises, so a hook keeps the last block's qkv
projection and only the k+1 query rows that are needed (cls, then the top-k patches) are
multiplied against the keys, in float32.

Prefix tokens other than the class token (DINOv2's registers, DeiT's distillation token: timm's
``num_prefix_tokens`` > 1) take part in the forward pass as the base model was trained, but are kept
out of the patch relation: the feature target is the patch tokens only, the attention rows are the
class token's and the top-k patches', and the columns are the class and patch keys only (the class
column is then dropped as always). A ViT with exactly one class token, pos_embed over it, runs the
very same operations as before this was added, so its targets are bit-identical.
"""
from __future__ import annotations

import contextlib
from typing import cast

import torch
from timm.layers import Attention
from timm.models import VisionTransformer
from torch import nn


def normalise_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 normalised [B,3,H,W] (ToTensor + Normalize)."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    # bf16 only on CUDA: CPUs here have no bf16 units and autocast there is 20x slower.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_targets(
    model: nn.Module, images: torch.Tensor, *, topk: int, last_layers: int, autocast: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of a timm ViT for a batch of normalised images.

    Returns feat [B,L,D] (mean of the last ``last_layers`` block outputs, patch tokens, no final
    norm), att [B,k+1,H,L] (scaled pre-softmax logits of the last block for the cls query row and
    the top-k patch query rows, cls key column dropped) and idx [B,k] int64 (top-k patches by the
    head-mean of the cls row's logits, descending). feat and att are float32.
    """
    # The base passed check_timm_vit: a timm ViT with timm's attention layout (nn.Module's attribute
    # typing, Tensor | Module, cannot say so).
    vit = cast(VisionTransformer, model)
    blocks = vit.blocks
    depth = len(blocks)
    npt = int(getattr(model, "num_prefix_tokens", 1))  # class token first, then registers/distillation
    last_attn = cast(Attention, blocks[-1].attn)
    captured: dict[str, torch.Tensor] = {}
    handle = last_attn.qkv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("qkv", out))
    try:
        with _autocast(images.device, autocast):
            x = vit.patch_embed(images)  # [B,L,D]
            if npt == 1 and not getattr(model, "no_embed_class", False) and not getattr(model, "dynamic_img_size", False):
                assert vit.cls_token is not None and vit.pos_embed is not None  # one prefix token, embedded with the patches
                cls = vit.cls_token.expand(x.shape[0], -1, -1)  # [B,1,D]
                x = torch.cat([cls, x], dim=1) + vit.pos_embed  # [B,1+L,D]
            else:
                x = vit._pos_embed(x)  # [B,P+L,D]: timm's own placing of cls, registers and pos_embed
            x = vit.norm_pre(x)  # CLIP's pre-norm; an identity for MAE/iBOT/DINOv2
            feat = None
            for i, blk in enumerate(blocks):
                x = blk(x)
                if i >= depth - last_layers:
                    patch = x[:, npt:].float()  # [B,L,D]
                    feat = patch if feat is None else feat + patch
    finally:
        handle.remove()
    assert feat is not None
    feat = feat / last_layers

    qkv = captured["qkv"].float()  # [B,P+L,3D]
    B, N, three_d = qkv.shape
    H = last_attn.num_heads
    hd = three_d // 3 // H
    # timm splits qkv as (3, H, hd) along channels: rows [q; k; v], heads contiguous.
    qkv = qkv.view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)  # [3,B,H,N,hd]
    q, k = qkv[0], qkv[1]
    q, k = last_attn.q_norm(q).float(), last_attn.k_norm(k).float()
    if npt > 1:
        k = torch.cat([k[:, :, :1], k[:, :, npt:]], dim=2)  # [B,H,1+L,hd]: cls and patch keys only
    scale = float(last_attn.scale)
    cls_row = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * scale  # [B,H,N]
    score = cls_row[:, :, 1:].mean(dim=1)  # [B,L] head-mean of logits, not probabilities
    idx = torch.topk(score, topk, dim=1, largest=True, sorted=True).indices  # [B,k]
    q_rows = torch.gather(q, 2, (idx + npt)[:, None, :, None].expand(B, H, topk, hd))  # [B,H,k,hd]
    rows = torch.einsum("bhkd,bhnd->bhkn", q_rows, k) * scale  # [B,H,k,N]
    att = torch.cat([cls_row[:, :, None], rows], dim=2)  # [B,H,k+1,N]
    att = att.permute(0, 2, 1, 3)[..., 1:].contiguous()  # [B,k+1,H,L]
    return feat, att, idx
