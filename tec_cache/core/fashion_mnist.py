"""Fashion-MNIST from local idx files (Debian's dataset-fashion-mnist), never downloaded.

Data flow: idx .gz files --read_split--> uint8 images [N,28,28] + labels --export_image_folder-->
an ImageNet-style folder (class subfolders of PNGs) that tec-cache build and the evaluators read.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "Fashion-MNIST is read from local files only. On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` "
    f"(files land in {DEFAULT_DIR}); elsewhere, put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from github.com/zalandoresearch/fashion-mnist) in a "
    "folder and pass it with --fashion-mnist DIR."
)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">I", data[:4])
    if got != magic:
        raise ValueError(f"{path}: not an idx file of the expected kind (magic {got:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: holds {arr.size} values, its header says {dims}")
    return arr.reshape(dims)


def read_split(split: str, root: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of 'train' or 'test'."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = Path(root) / img_name, Path(root) / lbl_name
    if not img_path.is_file() or not lbl_path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST {split} files not found in {root}. {HOW_TO_GET}")
    images = _read_idx(img_path, 0x803)
    labels = _read_idx(lbl_path, 0x801).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def subset_indices(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """A class-balanced, seeded subset of n indices (all when n is None or too large)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [p[: n // len(classes) + (1 if i < n % len(classes) else 0)] for i, p in enumerate(per)]
    return np.sort(np.concatenate(take))


def export_image_folder(out: Path, split: str, n: int | None = None, root: Path = DEFAULT_DIR, seed: int = 0) -> Path:
    """Write a class-subfolder PNG tree of ``n`` images of ``split``; skips files already there."""
    images, labels = read_split(split, root)
    out = Path(out)
    for c in CLASSES:
        (out / c).mkdir(parents=True, exist_ok=True)
    for i in subset_indices(labels, n, seed):
        path = out / CLASSES[labels[i]] / f"{split}-{i:05d}.png"
        if not path.exists():
            Image.fromarray(images[i]).save(path)  # 2-D uint8 -> mode L
    return out
