"""A plain MAE (masked pixel reconstruction) trained by the same loop as the TEC student.

Data flow: image folder --OnlineLoader (RandomResizedCrop + flip, as stage 1's views)--> images
--> ``PixelFeed.prepare`` (normalise) --> **MAEModel** (mask 75 %, encode visible patches,
decode all, per-patch normalised pixel loss on masked patches) --> step --> checkpoint. Its
state dict uses MAE's own names (encoder: cls_token, pos_embed, patch_embed, blocks, norm;
decoder: mask_token, decoder_embed, decoder_pos_embed, decoder_blocks, decoder_norm,
decoder_pred), so ``tec-train export`` turns it into a timm ViT and ``tec-cache build`` takes it
as a base model: a user (and this project's miniature reproduction) can make a base model from
scratch when none is given.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from tec_cache.core.images import ImageSource
from tec_cache.core.targets import normalise_images
from tec_cache.core.views import ViewRecipe

from .online import OnlineLoader
from .student import MODEL_SIZES, BlockNorm, MaskedEncoderMixin, init_linear_and_norm, parse_model_name, random_masking
from .target_feeds import ImageSpec, StepInputs

NORM_PIX_EPS = 1e-6
# MAE's decoder (512 wide, 8 deep, 16 heads) for the sizes MAE released; the small sizes keep
# its 8-to-1 encoder/decoder head ratio at a width and depth a CPU can train.
MAE_DECODERS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (256, 4, 8),
    "base": (512, 8, 16),
    "large": (512, 8, 16),
    "huge": (512, 8, 16),
}


@dataclass
class MAEOutput:
    """One MAE forward; the trainer logs ``loss`` only."""

    loss: torch.Tensor  # [] mean per-patch pixel error over masked patches
    pred: torch.Tensor  # [B, L, p*p*3]
    mask: torch.Tensor  # [B, L], 1 = masked


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, L, p*p*3], patches row-major, pixels (row, col, channel) within a patch."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)  # [B, 3, gh, p, gw, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, 3]
    return x.reshape(b, gh * gw, patch * patch * c)  # [B, L, p*p*3]


def pixel_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss: mean squared error per patch against (optionally per-patch normalised) pixels,
    averaged over masked patches only; computed in float32."""
    target = patchify(imgs.float(), patch)  # [B, L, p*p*3]
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)  # [B, L, 1]
        var = target.var(dim=-1, keepdim=True)  # [B, L, 1], unbiased as MAE's
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, L]
    return (per_patch * mask).sum() / mask.sum()


class MAEModel(MaskedEncoderMixin, nn.Module):
    """Masked autoencoder with a ViT encoder built from timm blocks and a light ViT decoder."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid_h, grid_w = self.patch_embed.grid_size
        self.num_patches = grid_h * grid_w
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos tables, stored as frozen parameters as MAE does.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=BlockNorm) for _ in range(depth)
        )
        self.norm = BlockNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=BlockNorm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = BlockNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * 3)
        self._init_weights(grid_h, grid_w, decoder_embed_dim)

    def _init_weights(self, grid_h: int, grid_w: int, decoder_embed_dim: int) -> None:
        self._init_tables_and_embeddings(grid_h, grid_w, decoder_embed_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        init_linear_and_norm(self)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> MAEOutput:
        """imgs [B, 3, S, S] normalised; noise [B, L] replays a mask (drawn fresh when None)."""
        b = imgs.shape[0]
        if noise is None:
            noise = torch.rand(b, self.num_patches, device=imgs.device)  # [B, L]
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # [B, L, C]
        x, mask, ids_restore = random_masking(x, noise, self.mask_ratio)  # [B, keep, C]
        x = torch.cat([self.cls_embed().expand(b, -1, -1), x], dim=1)  # [B, 1+keep, C]
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # [B, 1+keep, Cd]
        n_mask = self.num_patches + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n_mask, -1)], dim=1)  # [B, L, Cd], shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [B, L, Cd]
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [B, 1+L, Cd]
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, L, p*p*3]
        loss = pixel_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=mask)


def build_mae(name: str, *, img_size: int, patch_size: int | None = None, **overrides: Any) -> MAEModel:
    """MAE by timm-style encoder name ('vit_tiny_patch4', 'mae_vit_base_patch16', ...); overrides as
    MAEModel arguments (e.g. depth=4 for a CPU model)."""
    size, name_patch = parse_model_name(name)
    s = MODEL_SIZES[size]
    dec_dim, dec_depth, dec_heads = MAE_DECODERS[size]
    kwargs: dict[str, Any] = dict(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads,
                                  decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=dec_heads)
    kwargs.update(overrides)
    return MAEModel(img_size=img_size, patch_size=patch_size if patch_size is not None else name_patch, **kwargs)


class PixelFeed:
    """Augmented source images for the MAE objective: the pixels are the target, nothing else."""

    def __init__(self, images: ImageSource, *, img_size: int, patch_size: int, batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, pin_memory: bool) -> None:
        recipe = ViewRecipe(size=img_size)
        # Images only: the pixels are the target, there is no base model to describe.
        self.spec = ImageSpec(img_size=img_size, patch_size=patch_size, mean=recipe.mean, std=recipe.std,
                              origin={"kind": "pixels", "data": str(Path(images.root))})
        self.loader = OnlineLoader(images, batch_size=batch_size, recipe=recipe, rank=rank, world_size=world_size,
                                   num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.steps_per_epoch = self.loader.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Any]:
        return self.loader.epoch(epoch, start_step=start_step)

    def prepare(self, item: Any, device: torch.device) -> StepInputs:
        images = normalise_images(item.images.to(device, non_blocking=True), self.spec.mean, self.spec.std)
        return StepInputs(images, None, None, None)  # [B, 3, S, S]

    def view_epoch_for(self, epoch: int) -> int:
        return self.loader.view_epoch_for(epoch)

    def close(self) -> None:
        self.loader.close()
