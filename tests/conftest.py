"""Shared fixtures: tiny random-weight base models saved in the real checkpoint layouts, and image
folders with generated JPEGs, real photos (skimage.data) in odd sizes and modes, and broken files; an offline
Hugging Face hub cache for the timm/hub base tests."""
from __future__ import annotations

import io
import os
from pathlib import Path

# No test fetches base-model weights from the internet: a registry name without --checkpoint, or a
# timm/hub base, reads the local caches only; the fetch tests start their own server on 127.0.0.1
# and lift TEC_OFFLINE for themselves. Set before huggingface_hub is imported (it reads the variable then).
os.environ.setdefault("TEC_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tec_train.harness.checkpoints import PRETRAIN, CheckpointKind, latest_checkpoint

# Tests never need more than the two CI cores; more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_ARCH = "vit_tiny_patch16_224"
TINY_IMG = 32
TINY_PATCH = 8  # 4x4 grid = 16 patches keeps every test fast
TINY_TOPK = 3


def tiny_spec(**kw):
    from tec_cache.core.basemodels import resolve_spec

    args = dict(arch=TINY_ARCH, img_size=TINY_IMG, patch_size=TINY_PATCH, topk=TINY_TOPK)
    args.update(kw)
    return resolve_spec(None, **args)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from tec_cache.core.basemodels import build_model

    torch.manual_seed(seed)
    model = build_model(tiny_spec())
    # timm zero-initialises nothing that matters here, but pos_embed must be non-trivial for
    # the loaders' tests to tell a loaded model from a fresh one.
    with torch.no_grad():
        model.get_parameter("pos_embed").normal_(0, 0.02)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """An MAE-layout checkpoint ({'model': encoder state dict}) of the tiny base model."""
    path = tmp_path_factory.mktemp("ckpt") / "mae_tiny.pth"
    torch.save({"model": tiny_state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_ckpt) -> SimpleNamespace:
    """Built once per test run and shared read-only: 20 generated images and a 2-view-epoch int8
    WebDataset cache of them (shards of 5) from the tiny base model. A test that changes a cache
    copies it first."""
    from tec_cache.build.builder import BuildConfig, build_cache

    root = tmp_path_factory.mktemp("tiny-cache")
    data = make_image_folder(root / "data", n_per_class=8, bad=False)
    cache = root / "cache"
    build_cache(BuildConfig(data=data, out=cache, checkpoint=tiny_ckpt, spec=tiny_spec(), views=2, shard_size=5,
                            batch_size=8, num_workers=0, device="cpu"))
    return SimpleNamespace(root=root, data=data, ckpt=tiny_ckpt, cache=cache)


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image_folder(root: Path, n_per_class: int = 6, classes: int = 2, bad: bool = True, seed: int = 0) -> Path:
    """Class folders of generated JPEGs of varied sizes, plus odd modes and broken files."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (3 + c)) % 256, (yy * (5 + i)) % 256, ((xx + yy) * 7) % 256], -1)
            noise = rng.integers(0, 40, (h, w, 3))
            (d / f"img{i:03d}.jpg").write_bytes(_jpeg(((base + noise) % 256).astype(np.uint8)))
    d = root / "class0"
    gray = rng.integers(0, 255, (40, 50), dtype=np.uint8)
    Image.fromarray(gray, "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 45, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    if bad:
        (d / "zero.jpg").write_bytes(b"")
        (d / "notimage.jpg").write_bytes(b"this is not an image at all" * 10)
        good = _jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    return root


def add_skimage_photos(root: Path) -> list[str]:
    """Real photos of odd sizes and modes from scikit-image (no network)."""
    from skimage import data

    d = root / "photos"
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins"):
        arr = getattr(data, name)()
        img = Image.fromarray(arr)
        # Shrink so tests stay fast; keep the odd aspect ratios and the greyscale modes.
        img.thumbnail((96, 96))
        img.save(d / f"{name}.png")
        names.append(f"photos/{name}.png")
    return names


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache in tmp_path (huggingface_hub reads its variables at import, hence constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TEC_HOME", str(tmp_path / "tec-home"))
    return cache


def latest_saved(run_dir: Path, kind: CheckpointKind = PRETRAIN) -> Path:
    """The run's latest checkpoint; the test fails here, naming the run, when it saved none."""
    path = latest_checkpoint(run_dir, kind)
    assert path is not None, f"no checkpoint in {run_dir}"
    return path
