"""Augmented views: a deterministic RandomResizedCrop + flip per (seed, image key, view index).

Data flow: source bytes --load_source--> decoded source (a uint8 [3,H,W] tensor, or a PIL image
for the legacy resizer) --view_params--> crop box and flip --cut_view--> view pixels
--encode_views--> JPEG bytes (stored) --decode_views--> uint8 tensor the base model sees and the
student later sees, bit for bit.

The crop follows torchvision's RandomResizedCrop sampling (scale 0.2-1.0, log-uniform ratio
3/4-4/3, ten tries, then a centre crop), as the reference's transform does; only the random source
differs: each view draws from its own generator seeded by (seed, view, sha256(image key)), so a
view never depends on which rank, worker or batch made it.

The resize is part of the recipe (``ViewRecipe.resize``, recorded in the manifest), because the
three ways to resize give pixels that differ by rounding (one grey level on 0.1% of a
downscaled view's pixels, on 3-6% of an upscaled one's, more than one on fewer than 1 in 10,000:
overshoot at hard edges):
- ``pil-bicubic``: PIL's bicubic through torchvision on a PIL image (the reference's transform;
  every cache built before the resizer was recorded, and what a manifest without the key means).
- ``torch-bicubic-u8``: torch's antialiased bicubic on uint8 tensors (CPU only), 4x faster than
  PIL. New CPU builds.
- ``torch-bicubic-f32``: the same antialiased bicubic in float32, width then height with a
  rounding to uint8 between the passes as PIL does; runs on any device (a GPU build cuts its views
  with it); the closest to PIL on downscales (a few pixels in 100,000 differ).
"""
from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from tec_cache.core.images import check_image_header, decode_image
from tec_cache.format.manifest import LEGACY_RESIZE

PIL_BICUBIC = LEGACY_RESIZE
TORCH_U8 = "torch-bicubic-u8"
TORCH_F32 = "torch-bicubic-f32"
RESIZERS = (PIL_BICUBIC, TORCH_U8, TORCH_F32)
# Views cut on the CPU (worker processes) and on the base model's device (a CUDA build).
WORKER_RESIZE = TORCH_U8
DEVICE_RESIZE = TORCH_F32

# A decoded source image: uint8 [3,H,W] for the torch resizers, a PIL RGB image for PIL's.
SourceImage = Image.Image | torch.Tensor


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
    resize: str = WORKER_RESIZE

    def __post_init__(self) -> None:
        if self.resize not in RESIZERS:
            raise ValueError(f"resize: unknown resizer {self.resize!r}; expected one of {list(RESIZERS)}")

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


def image_size(img: SourceImage) -> tuple[int, int]:
    """(width, height) of a decoded source."""
    if isinstance(img, Image.Image):
        return img.width, img.height
    return int(img.shape[-1]), int(img.shape[-2])


def load_source(data: bytes, where: str, recipe: ViewRecipe) -> SourceImage:
    """Decode a source file into what ``recipe``'s resizer takes (BadImage names ``where``).

    JPEGs go through torchvision's libjpeg-turbo decode, whose RGB pixels equal PIL's (checked for
    RGB, greyscale and CMYK, baseline and progressive, any subsampling); every other format, and
    the legacy PIL resizer, through ``images.decode_image``."""
    if recipe.resize == PIL_BICUBIC:
        return decode_image(data, where)
    if check_image_header(data, where) == "JPEG":
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # what libjpeg refuses, PIL may still read (or name the damage)
    return torch.from_numpy(np.asarray(decode_image(data, where), dtype=np.uint8).copy()).permute(2, 0, 1)


def _as_input(img: SourceImage, resize: str) -> SourceImage:
    if resize == PIL_BICUBIC:
        return img if isinstance(img, Image.Image) else TF.to_pil_image(img)
    return img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img.convert("RGB"))


def _resize_aa(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def cut_view(img: SourceImage, params: ViewParams, recipe: ViewRecipe) -> torch.Tensor:
    """Crop, resize with ``recipe.resize`` and flip; uint8 [3,size,size] on the source's device."""
    img = _as_input(img, recipe.resize)
    S = recipe.size
    if isinstance(img, Image.Image):
        out = TF.resized_crop(img, params.top, params.left, params.height, params.width, [S, S],
                              interpolation=InterpolationMode(recipe.interpolation))
        if params.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    crop = img[None, :, params.top:params.top + params.height, params.left:params.left + params.width]  # [1,3,h,w]
    if recipe.resize == TORCH_U8:
        if crop.is_cuda:
            raise ValueError(f"resize {TORCH_U8!r} runs on the CPU only; views cut on a GPU use {TORCH_F32!r}")
        out = _resize_aa(crop, (S, S))  # [1,3,S,S] uint8
    else:
        # PIL's two passes, each rounded to uint8: width first, then height.
        wide = _resize_aa(crop.float(), (params.height, S)).round_().clamp_(0, 255)  # [1,3,h,S]
        out = _resize_aa(wide, (S, S)).round_().clamp_(0, 255).to(torch.uint8)  # [1,3,S,S]
    if params.flip:
        out = out.flip(-1)
    return out[0].contiguous()


def encode_views(pixels: list[torch.Tensor], quality: int) -> list[bytes]:
    """uint8 [3,H,W] views (all on one device) -> JPEG bytes; a GPU encodes the list in one call."""
    if not pixels:
        return []
    encoded = encode_jpeg(pixels, quality=quality) if pixels[0].is_cuda else [encode_jpeg(p, quality=quality) for p in pixels]
    return [e.cpu().numpy().tobytes() for e in encoded]


def encode_view(pixels: torch.Tensor, quality: int) -> bytes:
    """uint8 [3,H,W] -> JPEG bytes."""
    return encode_views([pixels], quality)[0]


def decode_view(data: bytes | memoryview) -> torch.Tensor:
    """JPEG bytes -> uint8 [3,H,W], on the CPU: the decode stage 2's loader does."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def make_views(
    img: SourceImage, image_key: str, views: list[int], seed: int, recipe: ViewRecipe
) -> list[tuple[int, bytes, torch.Tensor]]:
    """All requested views of one decoded image: (view index, JPEG bytes, decoded uint8 [3,S,S]).

    The pixels returned are the stored JPEG decoded on the CPU, as stage 2 decodes it."""
    img = _as_input(img, recipe.resize)
    w, h = image_size(img)
    cut = [cut_view(img, view_params(w, h, view_rng(seed, image_key, v), recipe), recipe) for v in views]
    return [(v, data, decode_view(data)) for v, data in zip(views, encode_views(cut, recipe.jpeg_quality))]


def source_for_device(data: bytes, where: str, recipe: ViewRecipe) -> tuple[bool, torch.Tensor]:
    """What a loader worker hands a device that cuts views: (True, the file's bytes as uint8 [N])
    for a JPEG, which the device decodes; (False, decoded uint8 [3,H,W]) for anything else."""
    if check_image_header(data, where) == "JPEG":
        return True, torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return False, _source_tensor(data, where, recipe)


def _source_tensor(data: bytes, where: str, recipe: ViewRecipe) -> torch.Tensor:
    """``load_source`` as uint8 [3,H,W]: what a recipe resized on tensors decodes to."""
    img = load_source(data, where, recipe)
    return img if isinstance(img, torch.Tensor) else TF.pil_to_tensor(img.convert("RGB"))


# Views whose device decode is compared with the CPU's before the device's decoder is trusted.
DECODER_CHECK_VIEWS = 256


class DeviceViews:
    """Views cut where the base model runs (a GPU build's ``--view-device device``): the source's
    JPEG decode (nvJPEG on a GPU), crop, resize (``torch-bicubic-f32``), flip and the views' JPEG
    encode and decode run on ``device``; the same code runs on CPU tensors.

    The base model must see the stored bytes' pixels exactly as stage 2 will decode them (on the
    CPU). So the views' JPEGs are decoded on the device only once its decoder has given the CPU's
    pixels for the first ``DECODER_CHECK_VIEWS`` views (each decoded both ways); at the first view
    where it does not, the build decodes views on the CPU from then on, in ``threads`` threads
    (libjpeg releases the GIL). ``decoded_on`` says which ("device" while still checking)."""

    def __init__(self, device: torch.device, recipe: ViewRecipe, threads: int) -> None:
        if recipe.resize != TORCH_F32:
            raise ValueError(f"views cut on the device are resized with {TORCH_F32!r}, the recipe asks for {recipe.resize!r}")
        self.device, self.recipe = device, recipe
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tec-view-decode")
        # A CPU "device" decodes with the CPU's own decoder: nothing to check.
        self.decoded_on = "cpu" if device.type == "cpu" else "device"
        self.checked = 0  # views whose device decode equalled the CPU's

    def source(self, handed: tuple[bool, torch.Tensor], where: str) -> torch.Tensor:
        """A worker's ``source_for_device`` result as uint8 [3,H,W] on the device (BadImage names
        ``where`` when the JPEG does not decode on the device nor with PIL)."""
        is_jpeg, t = handed
        if not is_jpeg:
            return t.to(self.device)
        try:
            return decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return _source_tensor(t.numpy().tobytes(), where, self.recipe).to(self.device)

    def make(self, img: torch.Tensor, image_key: str, views: list[int], seed: int) -> list[tuple[int, bytes, torch.Tensor]]:
        """``make_views`` on the device: (view index, JPEG bytes, decoded uint8 [3,S,S] on the device)."""
        w, h = image_size(img)
        r = self.recipe
        cut = [cut_view(img, view_params(w, h, view_rng(seed, image_key, v), r), r) for v in views]
        datas = encode_views(cut, r.jpeg_quality)
        return [(v, data, pix) for v, data, pix in zip(views, datas, self.decode(datas))]

    def decode(self, datas: list[bytes]) -> list[torch.Tensor]:
        """The views' pixels on the device, equal to the CPU's decode of ``datas``."""
        if self.decoded_on == "cpu":
            return [p.to(self.device) for p in self._pool.map(decode_view, datas)]
        on_device = self.device_decode(datas)
        if self.checked >= DECODER_CHECK_VIEWS:
            return on_device
        on_cpu = list(self._pool.map(decode_view, datas))
        if all(torch.equal(a.cpu(), b) for a, b in zip(on_device, on_cpu)):
            self.checked += len(datas)
            return on_device
        self.decoded_on = "cpu"
        return [p.to(self.device) for p in on_cpu]

    def device_decode(self, datas: list[bytes]) -> list[torch.Tensor]:
        """The device's JPEG decoder (nvJPEG on a GPU), all views in one call."""
        return decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], device=self.device)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
