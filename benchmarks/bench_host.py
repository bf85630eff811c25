"""Stage-1 host-side cost per view and per CPU core: everything a build does but the base-model
forward, stage by stage, held against the limit its unavoidable work sets.

One process, one torch thread, ViT-B-shaped int8 targets, K views per source image (500-px JPEG
photos from scikit-image). Three measurements, each over the same views in the same run:

- ``limit``: crop+resize, JPEG encode and JPEG decode of each view, timed alone (one loop doing
  only those three) with the resizer of the path.

Times are CPU seconds of the process (user and system): a cost per core. Waiting for the disk (the
fsync that ends each shard) is not one, and happens on the build's writer thread.
- ``cpu path`` (a build without a GPU, views cut in worker processes): source read and decode,
  crop+resize, JPEG encode, JPEG decode, quantisation, the per-view field copies, then the shard
  writer: zstd per field, tar members, sha256 and file writes. Its rate over the limit's is the
  ratio the host path is held to.
- ``device host share`` (``--view-device device`` on a GPU: the source decode, crop, resize, the
  views' JPEG encode and the quantisation run on the GPU): what is left to the host, timed
  exactly: reading the source file and checking its header, decoding the views' JPEGs on the CPU
  (the build does so when the GPU's decoder does not give the CPU's pixels, as stage 2 decodes
  them; both figures are given), the per-view field copies and records, and the shard writer.

    python benchmarks/bench_host.py --images 96 --views 4 --out benchmarks/results/host.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vitb_targets import DEFAULT_TARGETS_CACHE, photos, vitb_views_and_targets
from tec_cache import format as cache_format
from tec_cache.build.config import DEFAULT_COMPRESSOR
from tec_cache.core.codecs import TargetShape, get_codec, split_fields
from tec_cache.core.views import (
    ViewRecipe,
    cut_view,
    decode_view,
    encode_view,
    image_size,
    load_source,
    source_for_device,
    view_params,
    view_rng,
)
from tec_cache.format.base import ShardWriter
from tec_cache.format.payload import encode_targets, make_codec
from tec_cache.format.schema import ViewRecord, parse_compressor, record_key

VIT_B = TargetShape(196, 768, 12, 15)
CPU_DECODE = "views' jpeg decode (CPU)"


def source_jpegs() -> list[bytes]:
    """The photos as ImageNet-like source files: JPEG q90, longer side 500 px."""
    out = []
    for _, img in photos():
        img = img.copy()
        img.thumbnail((500, 500))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Clock:
    """Accumulates CPU seconds (this process's, user and system) per stage name: a cost per core,
    which waiting on the disk (the writer's fsync of each shard) is not."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.process_time()
        out = fn()
        self.t[stage] += time.process_time() - t0
        return out

    def per_view(self, n: int) -> dict[str, float]:
        return {k: round(v / n * 1e3, 4) for k, v in self.t.items()}


def time_limit(sources: list[bytes], images: int, k: int, recipe: ViewRecipe) -> float:
    """ms per view of crop+resize, JPEG encode and JPEG decode alone (sources decoded beforehand)."""
    decoded = [load_source(s, "bench", recipe) for s in sources]
    jobs = [(decoded[i % len(decoded)], f"img{i}", v) for i in range(images) for v in range(k)]
    params = [view_params(*image_size(img), view_rng(0, key, v), recipe) for img, key, v in jobs]
    t0 = time.process_time()
    for (img, _, _), p in zip(jobs, params):
        decode_view(encode_view(cut_view(img, p, recipe), recipe.jpeg_quality))
    return (time.process_time() - t0) / len(jobs) * 1e3


class ShardSink:
    """The stage-1 shard writer, rolling over every ``shard_size`` records, timed as one stage."""

    def __init__(self, root: Path, specs: dict, compressor: str, shard_size: int, clock: Clock, stage: str) -> None:
        self.root, self.specs, self.compressor, self.shard_size = root, specs, compressor, shard_size
        self.clock, self.stage = clock, stage
        self.writer: ShardWriter | None = None
        self.shard, self.count = 0, 0

    def write(self, rec: ViewRecord) -> None:
        def go() -> None:
            if self.writer is None:
                self.writer = cache_format.open_writer("webdataset", self.root / f"shard-{self.shard:06d}.tar",
                                                       self.specs, self.compressor)
            self.writer.write(rec)
            self.count += 1
            if self.count == self.shard_size:
                self.close()
        self.clock(self.stage, go)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer, self.shard, self.count = None, self.shard + 1, 0


def _split_writer_stage(clock: Clock, records: list[ViewRecord], specs: dict, compressor: str, stage: str) -> None:
    """Split the writer's time into its zstd share (the same records compressed again, alone) and the
    rest (tar members, sha256, file writes)."""
    codec = make_codec(parse_compressor(compressor))
    t0 = time.process_time()
    for r in records:
        encode_targets(r.fields, specs, codec)
    zstd = time.process_time() - t0 if codec is not None else 0.0
    total = clock.t.pop(stage)
    clock.t["writer: zstd"] = zstd
    clock.t["writer: tar + sha256 + file writes"] = max(total - zstd, 0.0)


def run_cpu_path(sources: list[bytes], targets: tuple, args: argparse.Namespace, recipe: ViewRecipe,
                 tmp: Path) -> dict[str, float]:
    """A worker-cut build's host work, stage by stage (ms per view)."""
    feat, att, idx = targets
    codec = get_codec(args.codec)
    specs = codec.field_specs(VIT_B)
    clock = Clock()
    sink = ShardSink(tmp, specs, args.compressor, args.shard_size, clock, "writer")
    pending: list[tuple[int, int, bytes]] = []
    written: list[ViewRecord] = []

    def flush() -> None:
        n = len(pending)
        if not n:
            return
        enc = clock("quantize", lambda: codec.encode(feat[:n], att[:n], idx[:n]))
        fields = clock("records (field copies, bookkeeping)", lambda: split_fields(enc))
        for (i, v, data), f in zip(pending, fields):
            rec = ViewRecord(record_key(i * args.views + v), i, v, -1, f"img{i}", data, f)
            sink.write(rec)
            written.append(rec)
        pending.clear()

    for i in range(args.images):
        src = sources[i % len(sources)]
        img = clock("source read + decode", partial(load_source, src, "bench", recipe))
        for v in range(args.views):
            p = view_params(*image_size(img), view_rng(0, f"img{i}", v), recipe)
            pix = clock("crop+resize", partial(cut_view, img, p, recipe))
            data = clock("jpeg encode", partial(encode_view, pix, recipe.jpeg_quality))
            clock("jpeg decode", partial(decode_view, data))
            pending.append((i, v, data))
            if len(pending) == args.batch:
                flush()
    flush()
    clock("writer", sink.close)
    _split_writer_stage(clock, written, specs, args.compressor, "writer")
    return clock.per_view(len(written))


def _decode_all(jpegs: list[bytes]) -> list[torch.Tensor]:
    return [decode_view(d) for d in jpegs]


def _records(codes: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` views of a batch's codes, split into per-view fields."""
    return split_fields({k: a[:n] for k, a in codes.items()})


def run_device_host_share(sources: list[bytes], targets: tuple, args: argparse.Namespace, recipe: ViewRecipe,
                          tmp: Path) -> dict[str, float]:
    """What a --view-device device build leaves to the host (ms per view). The device's work (the
    source decode, cut, views' JPEG encode, quantisation) is done before timing starts."""
    feat, att, idx = targets
    codec = get_codec(args.codec)
    specs = codec.field_specs(VIT_B)
    n_views = args.images * args.views
    # The device's output, computed untimed: each view's JPEG bytes and the batches' int8 codes
    # (on a GPU these arrive in host memory with one copy per batch).
    jpegs = []
    for i in range(args.images):
        img = load_source(sources[i % len(sources)], "bench", recipe)
        for v in range(args.views):
            jpegs.append(encode_view(cut_view(img, view_params(*image_size(img), view_rng(0, f"img{i}", v), recipe),
                                              recipe), recipe.jpeg_quality))
    codes = [codec.encode(feat[:args.batch], att[:args.batch], idx[:args.batch])
             for _ in range(-(-n_views // args.batch))]
    clock = Clock()
    sink = ShardSink(tmp, specs, args.compressor, args.shard_size, clock, "writer")
    written: list[ViewRecord] = []
    for i in range(args.images):
        clock("source read + header check", partial(source_for_device, sources[i % len(sources)], "bench", recipe))
    for b, enc in enumerate(codes):
        lo = b * args.batch
        batch = jpegs[lo:lo + args.batch]
        clock(CPU_DECODE, partial(_decode_all, batch))
        fields = clock("records (field copies, bookkeeping)", partial(_records, enc, len(batch)))
        for j, (data, f) in enumerate(zip(batch, fields)):
            rec = ViewRecord(record_key(lo + j), (lo + j) // args.views, 0, -1, f"img{lo + j}", data, f)
            sink.write(rec)
            written.append(rec)
    clock("writer", sink.close)
    _split_writer_stage(clock, written, specs, args.compressor, "writer")
    return clock.per_view(len(written))


def in_scratch(fn: Callable[[Path], dict[str, float]]) -> dict[str, float]:
    """``fn`` run with a scratch folder for its shards, removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        return fn(Path(tmp))


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median over repeated runs (this machine is shared and noisy)."""
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def table(title: str, per_view: dict[str, float]) -> str:
    total = sum(per_view.values())
    lines = [f"\n{title}\n", "| stage | ms/view |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in per_view.items()]
    lines.append(f"| **total** | **{total:.3f}** ({1e3 / total:.0f} views/s per core) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96, help="source images processed")
    ap.add_argument("--views", type=int, default=4, help="views cut from each decoded image (K)")
    ap.add_argument("--batch", type=int, default=64, help="views per quantise call (one base-model batch)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--compressor", default=DEFAULT_COMPRESSOR, help="the builds' default")
    ap.add_argument("--resizers", nargs="+", default=["pil-bicubic", "torch-bicubic-u8"],
                    help="the CPU path's resizers to time (pil-bicubic: builds before the resizer was recorded)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each measurement; per stage the median is kept")
    ap.add_argument("--targets-cache", type=Path, default=DEFAULT_TARGETS_CACHE)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, feat, att, idx = vitb_views_and_targets(32, args.targets_cache)
    # One batch worth of targets, laid out as the base model returns them (contiguous).
    sel = torch.arange(args.batch) % len(feat)
    targets = (feat[sel].contiguous(), att[sel].contiguous(), idx[sel].contiguous())
    sources = source_jpegs()
    res: dict[str, Any] = {"views": args.images * args.views, "images": args.images, "views_per_image": args.views,
                           "codec": args.codec, "compressor": args.compressor, "cpu_path": {}}
    print(f"stage-1 host side, 1 core, {args.images} images x {args.views} views, codec {args.codec}, "
          f"{args.compressor}")
    for resize in args.resizers:
        recipe = ViewRecipe(resize=resize)
        stages = median_stages([in_scratch(partial(run_cpu_path, sources, targets, args, recipe))
                                for _ in range(args.repeats)])
        limit = statistics.median(time_limit(sources, args.images, args.views, recipe) for _ in range(args.repeats))
        total = sum(stages.values())
        row = {"ms_per_view": stages, "total_ms": round(total, 4), "views_per_s_per_core": round(1e3 / total, 1),
               "limit_ms": round(limit, 4), "limit_views_per_s": round(1e3 / limit, 1),
               "ratio_to_limit": round(limit / total, 3)}
        res["cpu_path"][resize] = row
        print(table(f"CPU path, resize {resize}", stages))
        print(f"limit (crop+resize, JPEG encode, JPEG decode alone): {limit:.3f} ms/view = {1e3 / limit:.0f} views/s; "
              f"the path runs at {row['ratio_to_limit']:.0%} of it")
    recipe = ViewRecipe(resize="torch-bicubic-f32")
    share = median_stages([in_scratch(lambda d: run_device_host_share(sources, targets, args, recipe, d))
                           for _ in range(args.repeats)])
    total = sum(share.values())
    gpu_decodes = total - share[CPU_DECODE]
    res["device_host_share"] = {"ms_per_view": share, "total_ms": round(total, 4),
                                "views_per_s_per_core": round(1e3 / total, 1),
                                "views_per_s_per_core_gpu_decoder_trusted": round(1e3 / gpu_decodes, 1)}
    print(table("--view-device device: the host's share", share))
    print(f"without the CPU decode of the views (the GPU's decoder gave the CPU's pixels on the build's first "
          f"views): {gpu_decodes:.3f} ms/view = {1e3 / gpu_decodes:.0f} views/s per core")
    blob = np.random.default_rng(0).integers(0, 255, 46 << 20, dtype=np.uint8).tobytes()
    t0 = time.process_time()
    hashlib.sha256(blob).digest()
    whole = time.process_time() - t0
    per = len(blob) // 256
    t0 = time.process_time()
    for i in range(256):
        hashlib.sha256(blob[i * per:(i + 1) * per]).digest()
    records = time.process_time() - t0
    res["sha256_46MB_shard_ms"] = {"whole_shard": round(whole * 1e3, 2), "per_record_256": round(records * 1e3, 2)}
    print(f"\nsha256 of a 46 MB shard: {whole * 1e3:.1f} ms whole, {records * 1e3:.1f} ms as 256 per-record digests "
          "(each slice copied, as a per-record digest needs its bytes apart)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
