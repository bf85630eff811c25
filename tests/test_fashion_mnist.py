"""Fashion-MNIST is read from the Debian package's idx files (installed by scripts/setup.sh)."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from tec_cache.core.fashion_mnist import CLASSES, DEFAULT_DIR, export_image_folder, read_split, subset_indices
from tec_cache.core.images import open_source


def test_real_files_read():
    images, labels = read_split("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    train, _ = read_split("train")
    assert train.shape == (60000, 28, 28)


def test_export_balanced_folder(tmp_path):
    out = export_image_folder(tmp_path / "fm", "test", n=50)
    src = open_source(out)
    assert len(src) == 50 and src.classes == sorted(CLASSES)
    counts = np.bincount([it.label for it in src.items])
    assert counts.min() == counts.max() == 5
    img = Image.open(src.items[0].path)
    assert img.size == (28, 28) and img.mode == "L"


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_split("train", tmp_path)


def test_bad_idx_named(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(struct.pack(">I", 0x999) + b"\0" * 16)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: not an idx file"):
        read_split("test", tmp_path)


def test_subset_is_seeded_and_sorted():
    labels = np.repeat(np.arange(10), 7)
    a, b = subset_indices(labels, 23, seed=1), subset_indices(labels, 23, seed=1)
    assert np.array_equal(a, b) and len(a) == 23 and np.all(np.diff(a) > 0)
    assert DEFAULT_DIR.name == "fashion-mnist"
