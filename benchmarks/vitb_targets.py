"""ViT-B-shaped targets for the stage-1 benchmarks: a random-weight timm ViT-B/16 run by the
project's own target extractor over real photos (skimage.data), cut into 224 px views.

No pretrained weights are reachable offline, so the feature statistics are a random network's;
the shapes (L 196, D 768, H 12, k 15) and the code path are the real ones.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from tec_cache.core.targets import extract_targets, normalise_images
from tec_cache.core.views import ViewRecipe, make_views

# Where the stage-1 benchmarks keep the ViT-B targets between runs (computing them takes a minute).
DEFAULT_TARGETS_CACHE = Path(tempfile.gettempdir()) / "tec_bench_vitb_targets.pt"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "coins")


def photos() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        out.append((name, Image.fromarray(arr).convert("RGB")))
    return out


def vitb_views_and_targets(n_views: int = 32, cache: Path | None = None, seed: int = 0):
    """(list of (jpeg bytes, pixels uint8), feat [N,196,768], att [N,16,12,196], idx [N,15])."""
    if cache is not None and cache.exists():
        d = torch.load(cache, weights_only=True)
        jpegs = [bytes(t.numpy().tobytes()) for t in d["jpegs"]]
        return jpegs, d["feat"], d["att"], d["idx"]
    per = max(1, -(-n_views // len(PHOTOS)))
    jpegs, pixels = [], []
    for name, img in photos():
        for _, data, pix in make_views(img, name, list(range(per)), seed, ViewRecipe()):
            jpegs.append(data)
            pixels.append(pix)
    jpegs, pixels = jpegs[:n_views], pixels[:n_views]
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    x = normalise_images(torch.stack(pixels), ViewRecipe().mean, ViewRecipe().std)
    feats, atts, idxs = [], [], []
    for i in range(0, len(x), 8):
        f, a, k = extract_targets(model, x[i:i + 8], topk=15, last_layers=2)
        feats.append(f)
        atts.append(a)
        idxs.append(k)
    feat, att, idx = torch.cat(feats), torch.cat(atts), torch.cat(idxs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"jpegs": [torch.from_numpy(np.frombuffer(j, np.uint8).copy()) for j in jpegs],
                    "feat": feat, "att": att, "idx": idx}, cache)
    return jpegs, feat, att, idx
