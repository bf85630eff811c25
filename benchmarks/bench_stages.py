"""Where the time of a GPU build and of training from the cache goes: the follow-up to gpu_check.sh.

gpu_check.sh gives the rates; this says what limits them. In one run:
1. a stage-1 build (both view paths) at two sizes, so the fixed cost (workers starting, the model
   loading, the decoder check) separates from the per-view cost, with a stack sampler over every
   thread of the main process: what each thread was doing, as shares of the samples;
2. the cache loader alone, two passes (the first checks each shard's sha256, the second does not)
   at two worker counts, pinned as training pins;
3. training from the cache and from targets in memory, with the step's own record of how long it
   waited for data (``data_wait_fraction`` in metrics.jsonl).

    python benchmarks/bench_stages.py --tiny              # CPU, tiny sizes: the script's own check
    python benchmarks/bench_stages.py --device cuda       # ViT-B/16 at 224 in bf16 (device check)
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_gpu import cpu_seconds
from benchmarks.bench_train import forward_rate, make_images, so_far, sync
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.basemodels import build_model, resolve_spec
from tec_cache.format.manifest import load_manifest
from tec_train.cache_loader import CacheLoader
from tec_train.target_feeds import CacheTargetFeed, InMemoryTargetFeed
from tec_train.train import TrainConfig, train


class StackSampler:
    """Samples every thread's innermost project or library frame every ``interval`` seconds.

    A poor man's sampling profiler that sees the builder's writer threads too (cProfile sees one
    thread). Each sample is keyed by (thread name, 'file:function' of the innermost frame outside the
    standard library's threading/queue/selectors plumbing, i.e. the call that waits or works)."""

    _PLUMBING = ("threading.py", "queue.py", "selectors.py", "connection.py", "synchronize.py")

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _where(self, frame: Any) -> str:
        f = frame
        while f is not None:
            name = f.f_code.co_filename
            if not name.endswith(self._PLUMBING):
                return f"{Path(name).parent.name}/{Path(name).name}:{f.f_code.co_name}:{f.f_lineno}"
            f = f.f_back
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"

    def _run(self) -> None:
        names = {}
        while not self._stop.wait(self.interval):
            names.update({t.ident: t.name for t in threading.enumerate()})
            for ident, frame in sys._current_frames().items():
                if ident == self._thread.ident:
                    continue
                self.counts[(names.get(ident, str(ident)), self._where(frame))] += 1

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 12) -> dict[str, list[tuple[str, float]]]:
        """Per thread, its n most sampled places with their share of that thread's samples."""
        per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for (thread, where), c in self.counts.items():
            per[thread.split("_")[0] if thread.startswith("ThreadPoolExecutor") else thread][where] += c
        out = {}
        for thread, places in per.items():
            total = sum(places.values())
            out[thread] = [(w, round(c / total, 3)) for w, c in places.most_common(n)]
        return out


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, CPU s of this process and its finished children) of fn()."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: the script's own check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=None,
                    help="source images of the larger build (the smaller has a quarter); 6144, --tiny 64")
    ap.add_argument("--batch-size", type=int, default=256, help="build batch")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, nargs="+", default=[12, 15], help="worker counts: the first is the build's")
    ap.add_argument("--only-build", action="store_true", help="stop after the builds")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.tiny:
        args.device, args.batch_size, args.train_batch, args.steps, args.workers = "cpu", 16, 8, 4, [2, 1]
        args.images = args.images or 64
        arch, model, img, topk, depth = "vit_tiny_patch16_224", "vit_tiny_patch16", 64, 3, 2
    else:
        arch, model, img, topk, depth = "vit_base_patch16_224", "vit_base_patch16", 224, 15, None
        args.images = args.images or 6144
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="tec_bench_stages_"))
    spec = resolve_spec(None, arch=arch, img_size=img, patch_size=16, topk=topk, depth=depth)
    torch.manual_seed(0)
    base = build_model(spec)
    ckpt = work / "base.pth"
    torch.save({"model": base.state_dict()}, ckpt)
    t0 = time.perf_counter()
    data = make_images(work / "images", args.images)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "host_cores": torch.get_num_threads(),
                           "make_images_s": time.perf_counter() - t0}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        res["base_forward_views_per_s"] = forward_rate(base.to(device).eval(), spec, args.batch_size, device)
    del base
    so_far(res)

    # 1. builds: two sizes per view path, the larger one sampled
    small = work / "small"
    (small / "c").mkdir(parents=True)
    for p in sorted((data / "c").iterdir())[: args.images // 4]:
        (small / "c" / p.name).symlink_to(p)
    res["build"] = {}
    for path in ("workers", "device"):
        row: dict[str, Any] = {}
        for name, folder, n in (("small", small, args.images // 4), ("large", data, args.images)):
            cfg = BuildConfig(data=folder, out=work / f"cache-{path}-{name}", checkpoint=ckpt, spec=spec, views=1, shard_size=256,
                              batch_size=args.batch_size, num_workers=args.workers[0], device=str(device), view_device=path)
            sampler = StackSampler()
            with sampler:
                wall, cpu = timed(partial(build_cache, cfg))
            row[name] = {"views": n, "wall_s": round(wall, 2), "views_per_s": round(n / wall, 1),
                         "host_cores": round(cpu / wall, 2), "host_cpu_ms_per_view": round(1000 * cpu / n, 2)}
            if name == "large":
                row["threads"] = sampler.top()
        dn = row["large"]["views"] - row["small"]["views"]
        dt = row["large"]["wall_s"] - row["small"]["wall_s"]
        row["per_view_ms"] = round(1000 * dt / dn, 3)  # the marginal cost: fixed costs cancel
        row["fixed_s"] = round(row["small"]["wall_s"] - row["small"]["views"] * dt / dn, 2)
        row["marginal_views_per_s"] = round(dn / dt, 1) if dt > 0 else None
        res["build"][path] = row
        so_far(res)
    if args.only_build:
        finish(res, args.out)
        return

    # 2. the loader alone over the larger workers-path cache, two passes per worker count
    man = load_manifest(work / "cache-workers-large")
    res["loader"] = {}
    for w in args.workers:
        loader = CacheLoader(man, batch_size=args.train_batch, num_workers=w, pin_memory=device.type == "cuda")
        passes = []
        for _ in range(2):
            t0, n = time.perf_counter(), 0
            for b in loader.epoch(0):
                n += b.images.shape[0]
            passes.append(round(n / (time.perf_counter() - t0), 1))
        loader.close()
        res["loader"][f"{w}_workers_views_per_s"] = passes
        so_far(res)

    # 3. training from the cache and from targets in memory, with the step's data wait
    common = dict(model=model, img_size=img, patch_size=16, epochs=1000, warmup_epochs=1.0, batch_size=args.train_batch,
                  max_steps=args.steps, log_every=1, ckpt_every=10**9, keep_last=1, num_workers=args.workers[0],
                  device=str(device), seed=0, **({"depth": depth} if depth else {}))
    src = CacheTargetFeed(man, batch_size=args.train_batch, rank=0, world_size=1, num_workers=args.workers[0], seed=0,
                          view_order="cycle", pin_memory=device.type == "cuda")
    mem = InMemoryTargetFeed.from_source(src, args.steps, device)
    res["train"] = {}
    for mode in ("cache", "in_memory"):
        run = work / f"run-{mode}"
        sampler = StackSampler()
        with sampler:
            if mode == "cache":
                train(TrainConfig(run_dir=str(run), cache=str(work / "cache-workers-large"), **common))
            else:
                train(TrainConfig(run_dir=str(run), **common), source=mem)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        late = [r for r in recs if r["step"] > 3]
        res["train"][mode] = {"images_per_s": round(statistics.median(r["images_per_s"] for r in late), 1),
                              "data_wait_fraction": round(statistics.median(r["data_wait_fraction"] for r in late), 3),
                              "per_step_images_per_s": [round(r["images_per_s"]) for r in late],
                              "threads": sampler.top(8)}
        so_far(res)
    res["train"]["cache_over_in_memory"] = res["train"]["cache"]["images_per_s"] / res["train"]["in_memory"]["images_per_s"]
    finish(res, args.out)


def finish(res: dict[str, Any], out: Path | None) -> None:
    print(json.dumps(res, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
