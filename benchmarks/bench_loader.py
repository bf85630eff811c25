"""Stage-2 loader throughput: views/s per worker process on ViT-B-shaped cached targets.

Where it sits: shards + manifest --CacheLoader--> Batch (decoded uint8 images + still-quantised
target fields). This benchmark times exactly that path, JPEG decode included, so the number can
be held against the design goal (>= 1,000 views/s per CPU core, so the loader never bottlenecks a
GPU running the student).

The benchmark cache is written directly (no ViT-B forward): real 224 px JPEG views cut from
scikit-image photos with the stage-1 view recipe, and synthetic ViT-B-shaped targets (L=196,
D=768, H=12, k=15) put through the real codec, written with the stage-1 shard writer under a
manifest shaped like the one ``tec_cache.build`` writes.

    python benchmarks/bench_loader.py --out bench_loader.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tec_cache import shards as shard_io  # noqa: E402
from tec_cache.build import shard_relpath  # noqa: E402
from tec_cache.codecs import TargetShape, get_codec, split_fields  # noqa: E402
from tec_cache.manifest import MANIFEST_NAME, SCHEMA_VERSION, write_json_atomic  # noqa: E402
from tec_cache.records import ViewRecord, record_key  # noqa: E402
from tec_cache.views import ViewRecipe, make_views  # noqa: E402
from tec_train.data import CacheLoader  # noqa: E402

VIT_B = TargetShape(num_patches=196, dim=768, heads=12, topk=15)
IMG, PATCH = 224, 16
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")


def photo_views(count: int, seed: int, recipe: ViewRecipe) -> list[bytes]:
    """``count`` distinct 224 px JPEG views cut from real photos with the stage-1 recipe."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    per_photo = -(-count // len(photos))
    out = []
    for p, img in enumerate(photos):
        out += [jpeg for _, jpeg, _ in make_views(img, PHOTOS[p], list(range(per_photo)), seed, recipe)]
    return out[:count]


def synthetic_targets(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViT-B-shaped float targets with per-channel scales and offsets like real features."""
    L, D, H, k = VIT_B.num_patches, VIT_B.dim, VIT_B.heads, VIT_B.topk
    scale = torch.rand(1, 1, D, generator=gen) * 2 + 0.1
    feat = torch.randn(n, L, D, generator=gen) * scale + torch.randn(1, 1, D, generator=gen)
    att = torch.randn(n, k + 1, H, L, generator=gen) * 3
    idx = torch.stack([torch.randperm(L, generator=gen)[:k] for _ in range(n)])
    return feat, att, idx


def build_bench_cache(root: Path, *, fmt: str, codec_name: str, num_images: int, shard_size: int,
                      compressor: str = "zstd:3", seed: int = 0) -> Path:
    """Write a one-view-epoch cache of ``num_images`` ViT-B-shaped views at ``root``."""
    recipe = ViewRecipe(size=IMG)
    codec = get_codec(codec_name)
    specs = codec.field_specs(VIT_B)
    jpegs = photo_views(min(num_images, 256), seed, recipe)  # reused cyclically: decode cost is per view anyway
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for c, lo in enumerate(range(0, num_images, shard_size)):
        hi = min(lo + shard_size, num_images)
        rel = shard_relpath(fmt, 0, c)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        per_view = split_fields(codec.encode(*synthetic_targets(hi - lo, gen)))
        with shard_io.open_writer(fmt, path, specs, compressor) as w:
            for i, fields in zip(range(lo, hi), per_view):
                w.write(ViewRecord(record_key(i), i, 0, i % 1000, f"bench/{i:07d}.jpg", jpegs[i % len(jpegs)], fields))
            info = w.close()
        entries.append({"index": c, "path": rel, "num_samples": info.num_samples, "nbytes": info.nbytes,
                        "sha256": info.sha256})
    grid = IMG // PATCH
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bench_loader",
        "base_model": {"name": "synthetic", "arch": "vit_base_patch16_224", "sha256": hashlib.sha256(b"synthetic").hexdigest(),
                       "embed_dim": VIT_B.dim, "num_heads": VIT_B.heads},
        "targets": {"num_patches": VIT_B.num_patches, "grid": [grid, grid], "patch_size": PATCH, "dim": VIT_B.dim,
                    "heads": VIT_B.heads, "topk": VIT_B.topk, "last_layers": 2, "tau": 1.8},
        "views": {"count": 1, "seed": seed, "recipe": recipe.to_json(), "image_format": "jpeg"},
        "codec": {"name": codec.name, "fields": {k: v.to_json() for k, v in specs.items()}},
        "format": {"name": fmt, "compressor": compressor, "shard_size": shard_size},
        "source": {"num_images": num_images, "skipped": []},
        "view_epochs": [{"index": 0, "num_samples": num_images, "shards": entries}],
        "stats": {"total_bytes": sum(e["nbytes"] for e in entries), "total_views": num_images},
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return root


def time_loader(root: Path, *, num_workers: int, batch_size: int, epochs: int, verify: bool) -> dict[str, Any]:
    """Views/s over ``epochs`` full epochs after one warm-up epoch (worker start-up excluded from
    neither: a fresh DataLoader per epoch is what training pays too)."""
    loader = CacheLoader(root, batch_size=batch_size, num_workers=num_workers, verify=verify, seed=1)
    try:
        for _ in loader.epoch(0):  # warm the page cache and the imports
            pass
        views = 0
        t0 = time.perf_counter()
        for e in range(1, epochs + 1):
            for batch in loader.epoch(e):
                views += batch.images.shape[0]
        seconds = time.perf_counter() - t0
    finally:
        loader.close()
    total = views / seconds
    return {"views": views, "seconds": round(seconds, 3), "views_per_s": round(total, 1),
            "views_per_s_per_worker": round(total / max(num_workers, 1), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results path")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where to build the caches (default: a temp dir)")
    ap.add_argument("--images", type=int, default=2048, help="views per cache")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--codecs", nargs="+", default=["int8", "fp16"])
    ap.add_argument("--formats", nargs="+", default=list(shard_io.FORMATS))
    ap.add_argument("--no-verify", action="store_true", help="skip the per-shard sha256 check in the workers")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core per process: the number is per worker process

    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        rows = []
        for fmt in args.formats:
            for codec in args.codecs:
                t0 = time.perf_counter()
                root = build_bench_cache(Path(tmp) / f"{fmt}-{codec}", fmt=fmt, codec_name=codec,
                                         num_images=args.images, shard_size=args.shard_size)
                build_s = time.perf_counter() - t0
                man = json.loads((root / MANIFEST_NAME).read_text())
                bpv = man["stats"]["total_bytes"] / man["stats"]["total_views"]
                for nw in args.workers:
                    r = time_loader(root, num_workers=nw, batch_size=args.batch_size, epochs=args.epochs,
                                    verify=not args.no_verify)
                    rows.append({"format": fmt, "codec": codec, "num_workers": nw, "bytes_per_view": round(bpv),
                                 "build_s": round(build_s, 1), **r})
                    print(f"{fmt:10s} {codec:5s} workers={nw}: {r['views_per_s_per_worker']:8.1f} views/s/worker",
                          file=sys.stderr, flush=True)

    result = {
        "benchmark": "bench_loader",
        "config": {"images": args.images, "shard_size": args.shard_size, "batch_size": args.batch_size,
                   "epochs": args.epochs, "verify": not args.no_verify, "targets": VIT_B.__dict__, "img_size": IMG},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| format | codec | bytes/view | workers | views/s | views/s per worker |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['codec']} | {r['bytes_per_view']:,} | {r['num_workers']} | {r['views_per_s']:,.0f} "
              f"| {r['views_per_s_per_worker']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
