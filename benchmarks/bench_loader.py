"""Stage-2 loader throughput per worker process (views per CPU-second) on ViT-B-shaped cached targets.

Where it sits: shards + manifest --CacheLoader--> Batch (decoded uint8 images + still-quantised
target fields). This benchmark times exactly that path, JPEG decode included, and holds it against
the limit the JPEG decode sets: the same views decoded alone, in the same run (the goal: a worker's
first pass, sha256 check included, at >= 70% of that rate). The stages of a worker's first pass are
timed one by one, and so is a batch buffer in fresh against reused shared memory.

The benchmark cache is written directly, without running a ViT-B: real 224 px JPEG views cut
from the scikit-image photos with the stage-1 view recipe, and synthetic ViT-B-shaped targets
(L=196, D=768, H=12, k=15) put through the real codec, written with the stage-1 shard writer under
a manifest shaped like the one ``tec_cache.build.builder`` writes. A pool of distinct views is encoded
once and repeated; each record is still compressed, stored and decoded on its own.

    python benchmarks/bench_loader.py --out benchmarks/results/loader.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vitb_targets import photos
from tec_cache import format as cache_format
from tec_cache.build.config import DEFAULT_COMPRESSOR
from tec_cache.core.codecs import TargetShape, get_codec, split_fields
from tec_cache.core.views import ViewRecipe, decode_view, make_views
from tec_cache.format.fs import write_json_atomic
from tec_cache.format.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    load_manifest,
)
from tec_cache.format.schema import ViewRecord, record_key
from tec_cache.format.tar import read_shard_into
from tec_cache.format.writer import shard_relpath
from tec_train.cache_loader import CacheLoader, _BatchSlots, _ViewEpochShards

VIT_B = TargetShape(num_patches=196, dim=768, heads=12, topk=15)
IMG, PATCH = 224, 16
POOL = 64  # distinct views (JPEG + targets) the records cycle through


def photo_views(count: int, seed: int) -> list[bytes]:
    """``count`` 224 px JPEG views cut from real photos with the stage-1 recipe."""
    recipe = ViewRecipe(size=IMG)
    named = photos()
    per_photo = -(-count // len(named))
    out = [jpeg for name, img in named for _, jpeg, _ in make_views(img, name, list(range(per_photo)), seed, recipe)]
    return out[:count]


def synthetic_targets(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViT-B-shaped float targets: features with per-channel scales and offsets, attention logits,
    distinct top-k indices."""
    gen = torch.Generator().manual_seed(seed)
    L, D, H, k = VIT_B.num_patches, VIT_B.dim, VIT_B.heads, VIT_B.topk
    scale = torch.rand(1, 1, D, generator=gen) * 2 + 0.1
    feat = torch.randn(n, L, D, generator=gen) * scale + torch.randn(1, 1, D, generator=gen)
    att = torch.randn(n, k + 1, H, L, generator=gen) * 3
    idx = torch.stack([torch.randperm(L, generator=gen)[:k] for _ in range(n)])
    return feat, att, idx


def build_bench_cache(root: Path, *, fmt: str, codec_name: str, num_images: int, shard_size: int,
                      compressor: str = DEFAULT_COMPRESSOR, seed: int = 0) -> Path:
    """Write a one-view-epoch cache of ``num_images`` ViT-B-shaped views at ``root``."""
    codec = get_codec(codec_name)
    specs = codec.field_specs(VIT_B)
    jpegs = photo_views(POOL, seed)
    fields = split_fields(codec.encode(*synthetic_targets(POOL, seed)))
    entries: list[dict[str, Any]] = []
    for c, lo in enumerate(range(0, num_images, shard_size)):
        rel = shard_relpath(fmt, 0, c)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with cache_format.open_writer(fmt, path, specs, compressor) as w:
            for i in range(lo, min(lo + shard_size, num_images)):
                w.write(ViewRecord(record_key(i), i, 0, i % 1000, f"bench/{i:07d}.jpg", jpegs[i % POOL], fields[i % POOL]))
            info = w.close()
        entries.append({"index": c, "path": rel, "num_samples": info.num_samples, "nbytes": info.nbytes,
                        "sha256": info.sha256})
    grid = IMG // PATCH
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": "bench_loader",
        "base_model": {"name": "synthetic", "arch": "vit_base_patch16_224", "sha256": hashlib.sha256(b"synthetic").hexdigest(),
                       "embed_dim": VIT_B.dim, "num_heads": VIT_B.heads, "depth": 12},
        "targets": {"num_patches": VIT_B.num_patches, "grid": [grid, grid], "patch_size": PATCH, "dim": VIT_B.dim,
                    "heads": VIT_B.heads, "topk": VIT_B.topk, "last_layers": 2, "tau": 1.8},
        "views": {"count": 1, "seed": seed, "recipe": ViewRecipe(size=IMG).to_json(), "image_format": "jpeg"},
        "codec": {"name": codec.name, "fields": {k: v.to_json() for k, v in specs.items()}},
        "format": {"name": fmt, "compressor": compressor, "shard_size": shard_size},
        "source": {"path": "synthetic", "kind": "synthetic", "num_images": num_images, "skipped": []},
        "view_epochs": [{"index": 0, "num_samples": num_images, "shards": entries}],
        "stats": {"total_bytes": sum(e["nbytes"] for e in entries), "total_views": num_images},
    }
    write_json_atomic(root / MANIFEST_NAME, Manifest.from_json(manifest, root, "bench_loader").sealed().to_json())
    return root


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (DataLoader workers are joined per epoch)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _import_loader(worker_id: int) -> None:
    import tec_train.cache_loader  # noqa: F401  (what a real worker imports before its first batch)


def startup_cpu(num_workers: int, mp_context: str, repeats: int = 3) -> float:
    """CPU seconds that starting ``num_workers`` DataLoader workers costs, with no data read
    (median of ``repeats``: a spawned start varies by a fair fraction of a second)."""
    costs = []
    for _ in range(repeats):
        c0 = _children_cpu()
        # A list is a map-style dataset to DataLoader, though torch annotates the argument as Dataset.
        for _ in DataLoader(cast(Dataset, [0] * num_workers), batch_size=None, num_workers=num_workers,
                            multiprocessing_context=mp_context, worker_init_fn=_import_loader):
            pass
        costs.append(_children_cpu() - c0)
    return sorted(costs)[len(costs) // 2]


def time_loader(root: Path, *, num_workers: int, batch_size: int, epochs: int, verify: str) -> dict[str, Any]:
    """Throughput over ``epochs`` epochs, each with a fresh DataLoader (and workers) as in training.

    The per-core figure is CPU time: views per CPU-second of the process(es) doing the loading
    (the workers, or this process when ``num_workers`` is 0), less the workers' start-up (a spawned
    worker imports torch afresh). Unlike wall time it does not move with other load on the machine;
    wall time is reported as well.

    ``verify`` "first-pass": every timed epoch runs on a new CacheLoader, so it checks every shard's
    sha256 (what the first pass over each view-epoch of a run costs); "off": no checks, which is
    also what every later pass of a verifying run costs (each rank checks a shard once per run).
    """
    def make() -> CacheLoader:
        return CacheLoader(root, batch_size=batch_size, num_workers=num_workers, verify=verify == "first-pass", seed=1)

    loader = make()
    try:
        for _ in loader.epoch(0):  # page cache and lazy imports
            pass
        startup = startup_cpu(num_workers, loader.mp_context) if num_workers else 0.0
        views, wall, cpu, main_cpu = 0, 0.0, 0.0, 0.0
        for epoch in range(1, epochs + 1):
            if verify == "first-pass":
                loader.close()
                loader = make()
            t0, c0, p0 = time.perf_counter(), _children_cpu(), time.process_time()
            for batch in loader.epoch(epoch):
                views += batch.images.shape[0]
            wall += time.perf_counter() - t0
            cpu += (_children_cpu() - c0 - startup) if num_workers else time.process_time() - p0
            main_cpu += time.process_time() - p0
    finally:
        loader.close()
    return {"views": views, "wall_s": round(wall, 3), "loader_cpu_s": round(cpu, 3), "startup_cpu_s": round(startup, 3),
            "views_per_cpu_s": round(views / cpu, 1),
            "views_per_s_per_worker": round(views / wall / max(num_workers, 1), 1),
            # the main process's share: receiving each batch, and copying it out of a worker's reused segment
            "main_cpu_ms_per_view": round(main_cpu / views * 1e3, 4) if num_workers else None}


def decode_only(root: Path) -> float:
    """Views per second of one thread doing nothing but decode the cache's view JPEGs (the limit the
    loader is held to): the JPEG bytes are read out of the shards first, untimed."""
    man = load_manifest(root)
    jpegs = [r.image for e in man.shards() for r in man.open_shard(e)]
    decode_view(jpegs[0])
    t0 = time.process_time()
    for data in jpegs:
        decode_view(data)
    return len(jpegs) / (time.process_time() - t0)


def loader_stages(root: Path, batch_size: int) -> dict[str, float]:
    """ms per view of each step a worker takes on a first pass (tar shards), timed one by one in this
    process with the loader's own calls: reading a shard's file into the buffer of the shard read
    before, its sha256, indexing its members, decoding each record's fields into the batch buffer
    (zstd and raw), decoding the JPEGs and copying them into the batch buffer."""
    man = load_manifest(root)
    fmt = cache_format.get_format(man.format.name)
    t: dict[str, float] = {k: 0.0 for k in ("shard file read (into a reused buffer)", "sha256", "tar index",
                                             "fields into the batch buffer", "jpeg decode",
                                             "image copy into the batch buffer")}
    views = 0
    dataset = _ViewEpochShards(man, 0, cache_size=1, slots=_BatchSlots(0, 1))
    buffer = bytearray()

    def clock(stage: str, fn: Any) -> Any:
        c0 = time.process_time()
        out = fn()
        t[stage] += time.process_time() - c0
        return out

    def read(path: Path) -> memoryview:
        nonlocal buffer
        view, buffer = read_shard_into(path, buffer)
        return view

    for e in man.shards():
        path = man.shard_path(e)
        data = clock("shard file read (into a reused buffer)", partial(read, path))
        clock("sha256", lambda data=data: hashlib.sha256(data).hexdigest())
        reader = clock("tar index", partial(fmt.open_bytes, str(path), data, man.fields, man.format.compressor))
        for lo in range(0, len(reader), batch_size):
            n = min(batch_size, len(reader) - lo)
            layout, nbytes = dataset._layout(n)
            out = {name: np.empty(shape, dtype) for name, _, shape, dtype in layout}
            images = torch.from_numpy(out.pop("~images"))
            out.pop("~image_index")
            recs = clock("fields into the batch buffer", partial(reader.read_into, range(lo, lo + n), out, range(n)))
            decoded = clock("jpeg decode", lambda recs=recs: [decode_view(r.image) for r in recs])
            clock("image copy into the batch buffer",
                  lambda images=images, decoded=decoded: [images[j].copy_(img) for j, img in enumerate(decoded)])
            views += n
    return {k: round(v / views * 1e3, 4) for k, v in t.items()}


def batch_buffer_costs(root: Path, batch_size: int, repeats: int = 8) -> dict[str, float]:
    """ms per view of getting a batch's buffer and writing it once: a fresh shared-memory segment
    (what torch's collate takes in a worker, for every batch) against one reused (_BatchSlots), and
    private memory (in the main process), for a batch of ``batch_size`` views of this cache."""
    man = load_manifest(root)
    _, nbytes = _ViewEpochShards(man, 0, cache_size=1, slots=_BatchSlots(0, 1))._layout(batch_size)
    reused = torch.UntypedStorage._new_shared(nbytes)

    def cost(make: Any) -> float:
        c0 = time.process_time()
        for _ in range(repeats):
            torch.empty(0, dtype=torch.uint8).set_(make(), 0, (nbytes,), (1,)).fill_(1)
        return round((time.process_time() - c0) / repeats / batch_size * 1e3, 4)

    return {"fresh shared memory": cost(lambda: torch.UntypedStorage._new_shared(nbytes)),
            "reused shared memory": cost(lambda: reused),
            "fresh private memory": cost(lambda: torch.UntypedStorage(nbytes)),
            "batch_mb": round(nbytes / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results path")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where to build the caches (default: a temp dir)")
    ap.add_argument("--images", type=int, default=4096, help="views per cache (one epoch)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="0 = in the main process (gives the per-CPU-second figure)")
    ap.add_argument("--codecs", nargs="+", default=["int8", "fp16"])
    ap.add_argument("--formats", nargs="+", default=list(cache_format.FORMATS))
    ap.add_argument("--verify", nargs="+", choices=["first-pass", "off"], default=["first-pass", "off"],
                    help="first-pass: every timed epoch checks every shard's sha256 (a run's first pass over a "
                         "view-epoch); off: no checks (also every later pass of a verifying run)")
    ap.add_argument("--before", type=Path, default=None,
                    help="results JSON of this benchmark run by an earlier version just before, on the same machine: "
                         "printed and stored side by side, row by row")
    ap.add_argument("--before-label", default="before", help="what --before was run with (a commit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core per process: the number is per worker process

    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        rows: list[dict[str, Any]] = []
        limits: dict[str, dict[str, Any]] = {}
        for fmt in args.formats:
            for codec in args.codecs:
                t0 = time.perf_counter()
                root = build_bench_cache(Path(tmp) / f"{fmt}-{codec}", fmt=fmt, codec_name=codec,
                                         num_images=args.images, shard_size=args.shard_size)
                build_s = time.perf_counter() - t0
                man = json.loads((root / MANIFEST_NAME).read_text())
                bpv = man["stats"]["total_bytes"] / man["stats"]["total_views"]
                if fmt == "webdataset":
                    limits[codec] = {"decode_only_views_per_s": round(decode_only(root), 1),
                                     "stages_ms_per_view": loader_stages(root, args.batch_size),
                                     "batch_buffer_ms_per_view": batch_buffer_costs(root, args.batch_size)}
                for verify in args.verify:
                    for nw in args.workers:
                        r = time_loader(root, num_workers=nw, batch_size=args.batch_size, epochs=args.epochs,
                                        verify=verify)
                        rows.append({"format": fmt, "codec": codec, "verify": verify, "num_workers": nw,
                                     "bytes_per_view": round(bpv), "build_s": round(build_s, 1), **r})
                        print(f"{fmt:10s} {codec:5s} verify {verify:10s} workers={nw}: "
                              f"{r['views_per_cpu_s']:8.1f} views per CPU-s", file=sys.stderr, flush=True)

    result = {
        "benchmark": "bench_loader",
        "config": {"images": args.images, "shard_size": args.shard_size, "batch_size": args.batch_size,
                   "epochs": args.epochs, "targets": VIT_B.__dict__, "img_size": IMG},
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
        "limits": limits,
    }
    before = {}
    if args.before is not None:
        old = json.loads(args.before.read_text())
        before = {_row_key(r): r for r in old["rows"]}
        result["before"] = {"label": args.before_label, "rows": old["rows"], "limits": old.get("limits", {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"batch {args.batch_size}, shards of {args.shard_size}, {args.images} views/epoch, {args.epochs} timed epochs; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    label = f" ({args.before_label})" if before else ""
    print("| format | codec | bytes/view | verify | workers | views per worker CPU-s"
          + (f" | before{label} | speed-up" if before else "") + " | views/s per worker (wall) | main process ms/view |")
    print("|---|---|---:|---|---:|---:|" + ("---:|---:|" if before else "") + "---:|---:|")
    for r in rows:
        old = before.get(_row_key(r))
        then = (f" | {old['views_per_cpu_s']:,.0f} | {r['views_per_cpu_s'] / old['views_per_cpu_s']:.2f}x"
                if old else " | - | -") if before else ""
        main_ms = "-" if r["main_cpu_ms_per_view"] is None else f"{r['main_cpu_ms_per_view']:.3f}"
        print(f"| {r['format']} | {r['codec']} | {r['bytes_per_view']:,} | {r['verify']} "
              f"| {r['num_workers'] or '0 (in-process)'} | {r['views_per_cpu_s']:,.0f}{then} "
              f"| {r['views_per_s_per_worker']:,.0f} | {main_ms} |")
    for codec, lim in limits.items():
        rate = lim["decode_only_views_per_s"]
        print(f"\nwebdataset {codec}: JPEG decode alone {rate:,.0f} views/s per core; a worker's first pass, stage by stage:")
        print("| stage | ms/view |\n|---|---:|")
        for stage, ms in lim["stages_ms_per_view"].items():
            print(f"| {stage} | {ms:.3f} |")
        total = sum(lim["stages_ms_per_view"].values())
        print(f"| **total** | **{total:.3f}** ({1e3 / total:,.0f} views/s, {1e3 / total / rate:.0%} of decode alone) |")
        buf = lim["batch_buffer_ms_per_view"]
        print(f"batch buffer of {buf['batch_mb']} MB, ms/view to get and fill it: fresh shared memory "
              f"{buf['fresh shared memory']:.3f}, reused {buf['reused shared memory']:.3f}, "
              f"fresh private {buf['fresh private memory']:.3f}")
        for r in rows:
            if (r["format"], r["codec"], r["verify"], r["num_workers"]) == ("webdataset", codec, "first-pass", 1):
                print(f"loader, 1 worker, first pass: {r['views_per_cpu_s']:,.0f} views per worker CPU-s = "
                      f"{r['views_per_cpu_s'] / rate:.0%} of decode alone")
    return 0


def _row_key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return r["format"], r["codec"], r["verify"], r["num_workers"]


if __name__ == "__main__":
    raise SystemExit(main())
