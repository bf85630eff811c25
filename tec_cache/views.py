"""Augmented views: a deterministic RandomResizedCrop + flip per (seed, image key, view index).

Data flow: decoded source image --view_params--> crop box and flip --cut_view--> view pixels
--encode_view--> JPEG bytes (stored) --decode_view--> uint8 tensor the base model sees and the
student later sees, bit for bit.

The crop follows torchvision's RandomResizedCrop sampling (scale 0.2-1.0, log-uniform ratio
3/4-4/3, ten tries, then a centre crop) and resizes with PIL bicubic through torchvision, as the
reference's transform does; only the random source differs: each view draws from its own
generator seeded by (seed, view, sha256(image key)), so a view never depends on which rank, worker
or batch made it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF



@dataclass(frozen=True)
class ViewRecipe:
    """Everything that decides a view's pixels; recorded in the manifest."""

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    jpeg_quality: int = 95
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ViewParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def view_rng(seed: int, image_key: str, view: int) -> np.random.Generator:
    """The generator of one view: independent of order, rank and worker."""
    digest = hashlib.sha256(image_key.encode("utf-8")).digest()
    words = np.frombuffer(digest[:16], dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([seed, view, *words]))


def view_params(width: int, height: int, rng: np.random.Generator, recipe: ViewRecipe) -> ViewParams:
    """Crop box and flip, sampled like torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_lo, log_hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(recipe.scale[0], recipe.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return ViewParams(top, left, h, w, bool(rng.random() < recipe.hflip))
    in_ratio = width / height
    if in_ratio < min(recipe.ratio):
        w, h = width, int(round(width / min(recipe.ratio)))
    elif in_ratio > max(recipe.ratio):
        h, w = height, int(round(height * max(recipe.ratio)))
    else:
        w, h = width, height
    return ViewParams((height - h) // 2, (width - w) // 2, h, w, bool(rng.random() < recipe.hflip))


def cut_view(img: Image.Image, params: ViewParams, recipe: ViewRecipe) -> torch.Tensor:
    """Crop, resize (PIL bicubic) and flip; returns uint8 [3,size,size]."""
    out = TF.resized_crop(
        img, params.top, params.left, params.height, params.width, [recipe.size, recipe.size],
        interpolation=InterpolationMode(recipe.interpolation),
    )
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def encode_view(pixels: torch.Tensor, quality: int) -> bytes:
    """uint8 [3,H,W] -> JPEG bytes."""
    return encode_jpeg(pixels, quality=quality).numpy().tobytes()


def decode_view(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 [3,H,W], always on the CPU so both stages decode identically."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def make_views(
    img: Image.Image, image_key: str, views: list[int], seed: int, recipe: ViewRecipe
) -> list[tuple[int, bytes, torch.Tensor]]:
    """All requested views of one decoded image: (view index, JPEG bytes, decoded uint8 [3,S,S])."""
    out = []
    for v in views:
        params = view_params(img.width, img.height, view_rng(seed, image_key, v), recipe)
        data = encode_view(cut_view(img, params, recipe), recipe.jpeg_quality)
        out.append((v, data, decode_view(data)))
    return out
