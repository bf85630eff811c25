"""The fine-tuning augmentation (tec_train/augment.py): every RandAugment op of the reference recipe
at both ends of its magnitude on real images, the default recipe over enough images that every op
is drawn at its clipped maximum, and the batch-level and eval transforms at their extremes."""
from __future__ import annotations

import copy
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import timm.data.auto_augment as timm_aa
import torch
from PIL import Image
from timm.data import Mixup
from torchvision import transforms

from tec_cache.core import fashion_mnist
from tec_train.augment import finetune_train_transform, posterize_keep_bits
from tec_train.evaluate import eval_transform
from tec_train.finetune import MIXUP_MODES, FinetuneConfig

DEFAULT_AA = FinetuneConfig(run_dir="-").augment.aa
MAX_MAGNITUDE = 10  # timm clips the drawn magnitude to [0, 10]
FMNIST = fashion_mnist.DEFAULT_DIR
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"Fashion-MNIST idx files not in {FMNIST} (apt-get install dataset-fashion-mnist)")


def _recipe_ops(aa: str = DEFAULT_AA) -> list[timm_aa.AugmentOp]:
    tf = finetune_train_transform(32, aa=aa, reprob=0.25)
    assert isinstance(tf, transforms.Compose)
    (ra,) = [t for t in tf.transforms if isinstance(t, timm_aa.RandAugment)]
    return list(ra.ops)


def _real_images() -> dict[str, Image.Image]:
    """Real photos as the labelled datasets hand them to the transform: RGB PIL images."""
    from skimage import data

    imgs = {}
    for name in ("astronaut", "camera", "coffee"):  # camera is greyscale: converted as ImageFolder does
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        img.thumbnail((80, 80))
        imgs[name] = img
    if (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        from tec_train.labelled import FashionMNIST

        imgs["fashion-mnist"] = FashionMNIST("test", FMNIST)[0][0]
    return imgs


def test_recipe_has_the_reference_ops() -> None:
    names = {op.name for op in _recipe_ops()}
    assert names == set(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert {op.aug_fn for op in _recipe_ops() if op.name.startswith("Posterize")} == {posterize_keep_bits}


@pytest.mark.parametrize("magnitude", [0, MAX_MAGNITUDE])
def test_every_op_at_both_magnitude_extremes(magnitude: int) -> None:
    """Each op of the recipe, forced to fire at magnitude 0 and at the clipped maximum, on real photos."""
    for name, img in _real_images().items():
        for recipe_op in _recipe_ops():
            op = copy.copy(recipe_op)
            op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
            random.seed(0)
            out = op(img)
            assert isinstance(out, Image.Image), (name, op.name)
            assert out.size == img.size and out.mode == "RGB", (name, op.name, out.size, out.mode)
            arr = np.asarray(out)
            if op.name == "PosterizeIncreasing":
                # m = 10 keeps 0 bits: black, as the reference's Pillow gave; m = 0 keeps the top 4 bits.
                if magnitude == MAX_MAGNITUDE:
                    assert not arr.any(), name
                else:
                    assert not (arr % 16).any() and arr.any(), name


def test_posterize_keeps_what_pillow_keeps_for_one_to_eight_bits() -> None:
    from PIL import ImageOps

    img = _real_images()["astronaut"]
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(posterize_keep_bits(img, bits)), np.asarray(ImageOps.posterize(img, bits)))


class _MagnitudeSpy:
    """Records, per op name, every magnitude timm hands to the op's level function (after clipping)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)
        for name in timm_aa._RAND_INCREASING_TRANSFORMS:
            level = timm_aa.LEVEL_TO_ARG[name]
            if level is not None:
                monkeypatch.setitem(timm_aa.LEVEL_TO_ARG, name, self._level(name, level))
            else:  # AutoContrast, Equalize, Invert: no magnitude; count that they ran
                monkeypatch.setitem(timm_aa.NAME_TO_OP, name, self._op(name, timm_aa.NAME_TO_OP[name]))

    def _level(self, name, fn):
        def level(magnitude, hparams):
            self.seen[name].append(magnitude)
            return fn(magnitude, hparams)
        return level

    def _op(self, name, fn):
        def op(img, *args, **kw):
            self.calls[name] += 1
            return fn(img, *args, **kw)
        return op

    def missing_extremes(self) -> list[str]:
        at_max = {n for n, ms in self.seen.items() if MAX_MAGNITUDE in ms}
        ran = at_max | {n for n, c in self.calls.items() if c}
        return sorted(set(timm_aa._RAND_INCREASING_TRANSFORMS) - ran)


@pytest.mark.slow
def test_default_recipe_over_many_images_draws_every_op_at_its_maximum(monkeypatch) -> None:
    """N(9, 0.5) clipped at 10 reaches the maximum about 2% of the draws: 6,000 seeded images see
    every op there, as an ImageNet epoch does thousands of times."""
    spy = _MagnitudeSpy(monkeypatch)
    tf = finetune_train_transform(32, aa=DEFAULT_AA, reprob=0.25)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    imgs = list(_real_images().values())
    for i in range(6000):
        out = tf(imgs[i % len(imgs)])  # [3, 32, 32]
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    assert spy.missing_extremes() == []


@needs_fmnist
@pytest.mark.slow
def test_finetune_default_recipe_runs_through_every_extreme(monkeypatch, tmp_path: Path) -> None:
    """The issue's command in miniature: the default --aa over 6,000 Fashion-MNIST images, one
    epoch, every op drawn at its maximum along the way; it finishes with finite losses."""
    from tec_train.export import export_state_dict, save_export, timm_model_name
    from tec_train.finetune import finetune
    from tests.test_downstream import _records, _student

    student = _student()
    export = tmp_path / "export"
    save_export(export_state_dict(student.state_dict()), export, timm_model_name("vit_tiny_patch4"),
                {**student.encoder_config(), "student_model": "vit_tiny_patch4"})
    spy = _MagnitudeSpy(monkeypatch)
    cfg = FinetuneConfig(run_dir=str(tmp_path / "ft"), source=str(export), fashion_mnist=str(FMNIST), train_subset=6000,
                         val_subset=200, epochs=1, warmup_epochs=0.5, batch_size=200, num_workers=0, device="cpu")
    assert cfg.augment.aa == DEFAULT_AA
    res = finetune(cfg)
    assert res.epochs_run == 1 and np.isfinite(_records(tmp_path / "ft")[-1]["train_loss"])
    assert spy.missing_extremes() == []


@pytest.mark.parametrize("mode", MIXUP_MODES)
def test_mixup_cutmix_at_extreme_mixing(mode: str) -> None:
    """Beta(alpha) at tiny alpha gives lambda ~ 0 or 1 (empty or full CutMix boxes), at huge alpha ~ 0.5."""
    for alpha in (0.01, 0.8, 100.0):
        mix = Mixup(mixup_alpha=alpha, cutmix_alpha=alpha, prob=1.0, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                    num_classes=10)
        for seed in range(100):
            np.random.seed(seed)
            x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
            xm, ym = mix(x.clone(), y)
            assert torch.isfinite(xm).all() and xm.shape == x.shape
            assert torch.allclose(ym.sum(1), torch.ones(4)) and (ym >= 0).all()


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 500), (500, 3), (28, 28)])
def test_train_and_eval_transforms_on_degenerate_sizes(size: tuple[int, int]) -> None:
    """A 1-px image, slivers, and Fashion-MNIST's 28 px, through every op at the maximum, random
    erasing always on, and the eval resize/crop at any crop fraction."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    tf = finetune_train_transform(32, aa="rand-m10-mstd0-inc1", reprob=1.0)
    for seed in range(40):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        out = tf(img)
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    for crop_pct in (1.0, 0.875, 0.1):
        assert eval_transform(32, crop_pct)(img).shape == (3, 32, 32)
