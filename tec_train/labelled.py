"""Labelled image datasets for the downstream evaluations, read from local files only.

Data flow: --data DIR (ImageNet-style ``train/`` and ``val/`` class folders) or --fashion-mnist
[DIR] (idx files) --> **train / val datasets of (RGB PIL image, label)** --> the caller's
transform --> evaluate.py (kNN, linear probe) or finetune.py. Nothing is ever downloaded.
"""
from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from tec_cache.core import fashion_mnist
from tec_cache.runtime.faults import fault_point
from tec_cache.runtime.run_log import naming_sample

SUBSET_MODES = ("balanced", "random")
# The eval crop of each dataset kind: ImageNet's 224/256, none for tiny images (a 28 px image has
# no border to spare).
DEFAULT_CROP_PCT = {"image_folder": 0.875, "fashion_mnist": 1.0}


class FashionMNIST(Dataset):
    """One Fashion-MNIST split as (RGB PIL image, label); the grey image is replicated to 3 channels."""

    def __init__(self, split: str, root: Path = fashion_mnist.DEFAULT_DIR, transform: Callable | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--fashion-mnist: no folder {root}. {fashion_mnist.HOW_TO_GET}")
        self.split = split
        self.images, labels = fashion_mnist.read_split(split, root)  # uint8 [N, 28, 28], int64 [N]
        self.targets: list[int] = labels.tolist()
        self.classes = list(fashion_mnist.CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert("RGB")  # 2-D uint8 -> mode L
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


class Transformed(Dataset):
    """A view of a (PIL image, label) dataset with a transform applied to the image."""

    def __init__(self, base: Dataset, transform: Callable | None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return dataset_len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        # A failing image or transform names its sample, also from inside a loader worker.
        with naming_sample(sample_name(self.base, index)):
            fault_point("labelled_sample")
            img, label = self.base[index]
            return (self.transform(img) if self.transform is not None else img), label


def dataset_len(ds: Dataset) -> int:
    """The number of samples of a map-style dataset (torch's Dataset declares no ``__len__``)."""
    if not isinstance(ds, Sized):
        raise TypeError(f"{type(ds).__name__} has no length")
    return len(ds)


def sample_name(ds: Dataset, index: int) -> str:
    """Where sample ``index`` of ``ds`` comes from: a file path, or a split and index."""
    while isinstance(ds, Subset):
        index, ds = int(ds.indices[index]), ds.dataset
    if isinstance(ds, FashionMNIST):
        return f"Fashion-MNIST {ds.split} image {index}"
    samples = getattr(ds, "samples", None)  # torchvision ImageFolder: [(path, class), ...]
    if samples is not None:
        return f"image {samples[index][0]}"
    return f"sample {index} of {type(ds).__name__}"


@dataclass
class LabelledSplits:
    """Train and val datasets yielding (PIL image, label) -- or the transform's output when given."""

    train: Dataset
    val: Dataset
    classes: list[str]
    kind: str  # "image_folder" | "fashion_mnist"
    facts: dict[str, Any] = field(default_factory=dict)  # JSON: where the data came from, sizes, subsets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def default_crop_pct(self) -> float:
        return DEFAULT_CROP_PCT[self.kind]


def subset_indices(labels: list[int] | np.ndarray, n: int | None, *, seed: int = 0, mode: str = "balanced") -> np.ndarray:
    """Sorted indices of a seeded subset of ``n`` samples (all when n is None or >= the size).

    ``balanced`` takes (nearly) n / classes of every class, ``random`` a uniform draw.
    """
    if mode not in SUBSET_MODES:
        raise ValueError(f"--subset-mode: expected one of {', '.join(SUBSET_MODES)}, got {mode!r}")
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise ValueError(f"subset size must be a positive integer, got {n}")
    if mode == "balanced":
        return fashion_mnist.subset_indices(labels, n, seed)
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))


def _targets(ds: Dataset) -> list[int]:
    return list(ds.targets)  # type: ignore[attr-defined]  # ImageFolder and FashionMNIST both keep them


def _cut(ds: Dataset, n: int | None, seed: int, mode: str) -> Dataset:
    if n is None:
        return ds
    return Subset(ds, subset_indices(_targets(ds), n, seed=seed, mode=mode).tolist())


def image_folder_splits(root: Path) -> tuple[Dataset, Dataset, list[str]]:
    """torchvision ImageFolder over ``root/train`` and ``root/val`` (images converted to RGB)."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"--data: {root} needs ImageNet-style train/ and val/ class folders; missing {missing}")
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    if train.classes != val.classes:
        raise ValueError(f"--data: {root}: train/ and val/ have different class folders "
                         f"({len(train.classes)} vs {len(val.classes)}); labels would not line up")
    return train, val, list(train.classes)


def open_labelled(
    *,
    data: Path | None = None,
    fashion_mnist_dir: Path | None = None,
    train_transform: Callable | None = None,
    val_transform: Callable | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    subset_seed: int = 0,
    subset_mode: str = "balanced",
) -> LabelledSplits:
    """Open exactly one of ``data`` (ImageNet-style folder) or ``fashion_mnist_dir`` (idx files).

    Subsets are taken before the transforms and are identical on every rank for a given seed.
    """
    if (data is None) == (fashion_mnist_dir is None):
        raise ValueError("exactly one of --data DIR or --fashion-mnist [DIR] is required")
    for name, n in (("--train-subset", train_subset), ("--val-subset", val_subset)):
        if n is not None and n < 1:
            raise ValueError(f"{name}: must be a positive integer, got {n}")
    if data is not None:
        train, val, classes = image_folder_splits(Path(data))
        kind, where = "image_folder", str(data)
    else:
        assert fashion_mnist_dir is not None  # exactly one of the two, checked above
        train = FashionMNIST("train", Path(fashion_mnist_dir))
        val = FashionMNIST("test", Path(fashion_mnist_dir))
        classes, kind, where = train.classes, "fashion_mnist", str(fashion_mnist_dir)
    full = (dataset_len(train), dataset_len(val))
    train = _cut(train, train_subset, subset_seed, subset_mode)
    val = _cut(val, val_subset, subset_seed + 1, subset_mode)
    facts = {"kind": kind, "path": where, "num_classes": len(classes), "train_images": dataset_len(train),
             "val_images": dataset_len(val), "full_sizes": list(full), "train_subset": train_subset,
             "val_subset": val_subset, "subset_seed": subset_seed, "subset_mode": subset_mode}
    return LabelledSplits(Transformed(train, train_transform), Transformed(val, val_transform), classes, kind, facts)
