"""Stage-2 throughput: training from the cache against online mode and against targets in memory.

Same student, same base model, same batch, same machine, one process. Measures, in order:
1. the base-model forward alone (views/s),
2. a stage-1 build of the benchmark images (views/s),
3. the cache loader alone (views/s, images decoded, targets still quantised),
4. three training step rates: online (base model inside the step, the reference's way), from the
   cache, and from targets already in memory (no loader: the ceiling).
The cache's speedup over online is bounded by online vs in-memory; the goal is cache >= 95% of
in-memory. Runs on CPU with tiny sizes (default) and on a GPU with ViT-B/16 at 224 in bf16:

    python benchmarks/bench_train.py                                   # tiny, CPU
    python benchmarks/bench_train.py --arch vit_small_patch16_224 --model vit_small_patch16 \
        --img-size 224 --batch-size 8                                  # ViT-S/16 pair, CPU
    python benchmarks/bench_train.py --arch vit_base_patch16_224 --model vit_base_patch16 \
        --img-size 224 --batch-size 128 --device cuda --images 4096   # ViT-B/16 pair, GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.basemodels import build_model, resolve_spec
from tec_cache.core.targets import extract_targets
from tec_cache.format.manifest import load_manifest
from tec_cache.runtime.dist import DistInfo, resolve_device
from tec_train.cache_loader import CacheLoader
from tec_train.target_feeds import CacheTargetFeed, InMemoryTargetFeed
from tec_train.train import TrainConfig, train


def make_images(root: Path, n: int) -> Path:
    """n source images cut from skimage's photos at ImageNet-like sizes (offline, no dataset)."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, k)()).convert("RGB") for k in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = int(rng.integers(p.width // 2, p.width)), int(rng.integers(p.height // 2, p.height))
        x, y = int(rng.integers(0, p.width - w + 1)), int(rng.integers(0, p.height - h + 1))
        p.crop((x, y, x + w, y + h)).save(root / "c" / f"{i:05d}.jpg", quality=90)
    return root


def timed_rate(fn, n_items: int, repeat: int) -> float:
    fn()  # warm-up (allocations, cudnn/SDPA selection)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return n_items * repeat / (time.perf_counter() - t0)


def forward_rate(model: torch.nn.Module, spec, batch: int, device: torch.device) -> float:
    """Views/s of the base model's target extraction alone."""
    x = torch.randn(batch, 3, spec.img_size, spec.img_size, device=device)
    return timed_rate(lambda: extract_targets(model, x, topk=spec.topk, last_layers=spec.last_layers), batch, 3)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_rates(run_dir: Path, warmup: int) -> list[float]:
    """images/s of each logged step after ``warmup`` (one metrics record per step)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in recs if r["step"] > warmup]


def so_far(res: dict) -> None:
    """What is measured so far, one line: a run cut off by its time limit still reports it."""
    print("so far: " + json.dumps(res, default=str), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_tiny_patch16_224", help="base model (timm)")
    ap.add_argument("--base-depth", type=int, default=6)
    ap.add_argument("--model", default="vit_tiny_patch4", help="student (tec-train --model)")
    ap.add_argument("--depth", type=int, default=None, help="student depth override")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--topk", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=None, help="source images (default: enough for the steps)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="turns of the three training modes (interleaved)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--format", default="webdataset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.base_depth <= 0:
        args.base_depth = None
    device = resolve_device(args.device, DistInfo(0, 1, 0))
    patch = args.patch_size or (4 if args.img_size <= 64 else 16)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tec_bench_train_"))
    n_img = args.images or args.batch_size * (args.steps + args.warmup + 1)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch_threads": torch.get_num_threads(), "arch": args.arch, "model": args.model,
                 "img_size": args.img_size, "batch_size": args.batch_size, "codec": args.codec, "format": args.format}

    spec = resolve_spec(None, arch=args.arch, img_size=args.img_size, patch_size=patch, topk=args.topk, depth=args.base_depth)
    torch.manual_seed(0)
    base = build_model(spec)
    ckpt = work / "base.pth"
    torch.save({"model": base.state_dict()}, ckpt)
    data = make_images(work / "images", n_img)

    # 1. base-model forward alone
    res["base_forward_views_per_s"] = forward_rate(base.to(device).eval(), spec, args.batch_size, device)
    del base  # free the device memory before the training runs
    so_far(res)

    # 2. stage-1 build
    cache = work / "cache"
    t0 = time.perf_counter()
    build_cache(BuildConfig(data=data, out=cache, checkpoint=ckpt, spec=spec, views=1, codec=args.codec, format=args.format,
                            shard_size=max(64, args.batch_size * 2), batch_size=args.batch_size,
                            num_workers=args.num_workers, device=str(device)))
    res["build_views_per_s"] = n_img / (time.perf_counter() - t0)
    man = load_manifest(cache)
    assert man.stats is not None  # a cache this build just wrote records its stats
    res["bytes_per_view"] = man.stats.bytes_per_view
    # Where the build cut its views and which resizer it recorded (a CUDA build cuts on the GPU and
    # decodes the views there only if its decoder gave the CPU's pixels on the first views).
    build = dict(man.stats.build or {})
    res["views"] = {"resize": man.views.recipe.resize, "cut_on": build.get("views_cut_on"),
                    "decoded_on": build.get("views_decoded_on"), "device_decoder_checked_views": build.get("device_decoder_checked_views")}

    # 3. the loader alone
    loader = CacheLoader(man, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    t0, n = time.perf_counter(), 0
    for b in loader.epoch(0):
        n += b.images.shape[0]
    res["loader_views_per_s"] = n / (time.perf_counter() - t0)
    res["loader_workers"] = args.num_workers
    loader.close()
    so_far(res)

    # 4. training step rates
    common = dict(model=args.model, depth=args.depth, img_size=args.img_size, patch_size=patch,
                  epochs=1000, warmup_epochs=1.0, batch_size=args.batch_size, max_steps=args.warmup + args.steps,
                  log_every=1, ckpt_every=10**9, keep_last=1, num_workers=args.num_workers, device=str(device), seed=0)
    src = CacheTargetFeed(man, batch_size=args.batch_size, rank=0, world_size=1, num_workers=args.num_workers, seed=0,
                            view_order="cycle", pin_memory=device.type == "cuda")
    mem = InMemoryTargetFeed.from_source(src, args.warmup + args.steps, device)
    rates: dict[str, list[float]] = {"online": [], "cache": [], "in_memory": []}
    # The three modes take turns, round after round, so a slow spell of a shared machine falls on
    # all of them; each rate is the median over every timed step of every round.
    peaks: dict[str, float] = {}
    for r in range(args.rounds):
        runs = {"online": (TrainConfig(run_dir=str(work / f"run-online-{r}"), arch=args.arch, checkpoint=str(ckpt),
                                       data=str(data), topk=args.topk, base_depth=args.base_depth, **common), None),
                "cache": (TrainConfig(run_dir=str(work / f"run-cache-{r}"), cache=str(cache), **common), None),
                "in_memory": (TrainConfig(run_dir=str(work / f"run-memory-{r}"), **common), mem)}
        for mode, (cfg, source) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            train(cfg, source=source) if source is not None else train(cfg)
            rates[mode] += step_rates(Path(cfg.run_dir), args.warmup)
            if device.type == "cuda":  # peak device memory of the mode's step, GiB
                peaks[mode] = max(peaks.get(mode, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            so_far({"round": r, "mode": mode, "images_per_s": rates[mode], "peak_gib": peaks.get(mode)})
    res["peak_gib"] = peaks or None
    for mode, values in rates.items():
        res[f"{mode}_images_per_s"] = statistics.median(values)
    res["rounds"] = args.rounds
    res["ceiling_in_memory_over_online"] = res["in_memory_images_per_s"] / res["online_images_per_s"]
    res["speedup_cache_over_online"] = res["cache_images_per_s"] / res["online_images_per_s"]
    res["cache_over_in_memory"] = res["cache_images_per_s"] / res["in_memory_images_per_s"]

    print(f"\n{args.arch} base -> {args.model} student, {args.img_size} px, batch {args.batch_size}, {res['device']}\n")
    print("| measure | value |\n|---|---|")
    for k in ("base_forward_views_per_s", "build_views_per_s", "loader_views_per_s", "online_images_per_s",
              "cache_images_per_s", "in_memory_images_per_s", "ceiling_in_memory_over_online",
              "speedup_cache_over_online", "cache_over_in_memory", "bytes_per_view"):
        print(f"| {k} | {res[k]:.3f} |")
    print(f"| views | {res['views']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
