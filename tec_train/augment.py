"""The fine-tuning train transform (method.md 6, MAE's build_transform), built from timm's parts.

Data flow: labelled (RGB PIL image, label) --> **RandomResizedCrop + flip, RandAugment, to tensor,
ImageNet mean/std, random erasing** --> finetune.py (Mixup/CutMix follow on the batch there).

timm's RandAugment calls Pillow for its ops. One of them changed meaning under the Pillow this
project installs: the "increasing" posterize of the recipe (``rand-m9-mstd0.5-inc1``) keeps
``4 - int(4 * m / 10)`` bits, so at the clipped magnitude m = 10 it keeps 0 bits. The Pillow of
the reference's days (MAE: timm 0.3.2 on Pillow 8/9) computed the mask ``~(2**8 - 1)`` and returned
an all-black image; Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``.
We keep the reference's meaning (0 bits = every channel 0), so the recipe's augmentation
distribution is the one the paper fine-tuned with, on every Pillow version.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment

NO_AUGMENT = ("", "none")


def posterize_keep_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the top ``bits_to_keep`` bits of every channel; 0 bits gives a black image, as Pillow < 11 did."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point(lambda _v: 0)  # the mask ~(2**8 - 1) clears every bit of every band
    return ImageOps.posterize(img, bits)


def _augment_ops(tf: Any) -> Iterator[AugmentOp]:
    """Every timm AugmentOp inside a transform (Compose, RandAugment, AutoAugment, AugMix)."""
    if isinstance(tf, RandAugment):
        yield from tf.ops
    elif isinstance(tf, AutoAugment):
        for sub_policy in tf.policy:
            yield from sub_policy
    elif isinstance(tf, AugMixAugment):
        yield from tf.ops
    for child in getattr(tf, "transforms", None) or []:
        yield from _augment_ops(child)


def reference_posterize(tf: Callable) -> Callable:
    """Point every posterize op of ``tf`` at :func:`posterize_keep_bits` (in place; returns ``tf``).

    The op's level mapping and the magnitude noise stay timm's: only what 0 kept bits means changes.
    """
    for op in _augment_ops(tf):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keep_bits
    return tf


def finetune_train_transform(img_size: int, *, aa: str | None, reprob: float,
                             mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Callable:
    """MAE's fine-tuning train transform: RandomResizedCrop(scale 0.08-1) + flip, RandAugment
    ``aa`` (no colour jitter with it), bicubic, ImageNet mean/std (a timm/hub base: its own),
    random erasing (pixel mode, one box, probability ``reprob``). ``aa`` of None, "" or "none"
    turns RandAugment off."""
    auto_augment = None if aa is None or aa.lower() in NO_AUGMENT else aa
    # color_jitter=None: timm's own "no colour jitter", which its annotation leaves out.
    tf = create_transform(input_size=img_size, is_training=True, color_jitter=None,  # type: ignore[arg-type]  # None is timm's "off"
                          auto_augment=auto_augment,
                          interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                          mean=tuple(mean), std=tuple(std))
    return reference_posterize(tf)
