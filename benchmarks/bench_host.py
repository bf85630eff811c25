"""Stage-1 host-side throughput per CPU core: everything but the base-model forward.

One process, one torch thread: decode each source image once, cut K views (RandomResizedCrop +
flip, PIL bicubic as the reference), JPEG-encode them, decode them back (the pixels the base
model sees), quantise ViT-B-shaped targets with the int8 codec, compress and write webdataset
shards with the project's writer. Reports ms/view per stage and views/s per core, with the
quantisation on the CPU and without it (a CUDA build quantises on the GPU).

    python benchmarks/bench_host.py --images 64 --views 4 --out benchmarks/results/host.json
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vitb_targets import photos, vitb_views_and_targets  # noqa: E402
from tec_cache import format as cache_format  # noqa: E402
from tec_cache.codecs import TargetShape, get_codec, split_fields  # noqa: E402
from tec_cache.format.schema import ViewRecord, record_key  # noqa: E402
from tec_cache.images import decode_image  # noqa: E402
from tec_cache.views import ViewRecipe, cut_view, decode_view, encode_view, view_params, view_rng  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="source images processed")
    ap.add_argument("--views", type=int, default=4, help="views cut from each decoded image (K)")
    ap.add_argument("--batch", type=int, default=64, help="views per quantise call (one base-model batch)")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--targets-cache", type=Path, default=Path(tempfile.gettempdir()) / "tec_bench_vitb_targets.pt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, feat, att, idx = vitb_views_and_targets(32, args.targets_cache)
    # One batch worth of targets, laid out as the base model returns them (contiguous).
    sel = torch.arange(args.batch) % len(feat)
    feat, att, idx = feat[sel].contiguous(), att[sel].contiguous(), idx[sel].contiguous()
    codec = get_codec(args.codec)
    specs = codec.field_specs(TargetShape(196, 768, 12, 15))
    sources = source_jpegs()
    recipe = ViewRecipe()
    t: dict[str, float] = defaultdict(float)
    n_views = 0
    pending: list[tuple[int, int, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        writer, shard_no, in_shard = None, 0, 0

        def flush() -> None:
            nonlocal writer, shard_no, in_shard
            if not pending:
                return
            n = len(pending)
            t0 = time.perf_counter()
            fields = split_fields(codec.encode(feat[:n], att[:n], idx[:n]))
            t["quantize"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            for (i, v, data), f in zip(pending, fields):
                if writer is None:
                    writer = cache_format.open_writer("webdataset", Path(tmp) / f"shard-{shard_no:06d}.tar", specs, "zstd:3")
                writer.write(ViewRecord(record_key(i * args.views + v), i, v, -1, f"img{i}", data, f))
                in_shard += 1
                if in_shard == args.shard_size:
                    writer.close()
                    writer, shard_no, in_shard = None, shard_no + 1, 0
            t["compress+write"] += time.perf_counter() - t0
            pending.clear()

        wall0 = time.perf_counter()
        for i in range(args.images):
            t0 = time.perf_counter()
            img = decode_image(sources[i % len(sources)], "bench")
            t["source decode"] += time.perf_counter() - t0
            for v in range(args.views):
                t0 = time.perf_counter()
                p = view_params(img.width, img.height, view_rng(0, f"img{i}", v), recipe)
                pix = cut_view(img, p, recipe)
                t1 = time.perf_counter()
                data = encode_view(pix, recipe.jpeg_quality)
                t2 = time.perf_counter()
                decode_view(data)
                t3 = time.perf_counter()
                t["crop+resize"] += t1 - t0
                t["jpeg encode"] += t2 - t1
                t["jpeg decode"] += t3 - t2
                pending.append((i, v, data))
                n_views += 1
                if len(pending) == args.batch:
                    flush()
        flush()
        if writer is not None:
            t0 = time.perf_counter()
            writer.close()
            t["compress+write"] += time.perf_counter() - t0
        wall = time.perf_counter() - wall0
    per_view = {k: v / n_views * 1e3 for k, v in t.items()}
    total = sum(per_view.values())
    no_q = total - per_view["quantize"]
    res = {"views": n_views, "images": args.images, "views_per_image": args.views, "codec": args.codec,
           "ms_per_view": {k: round(v, 4) for k, v in per_view.items()},
           "views_per_s_per_core": round(1e3 / total, 1),
           "views_per_s_per_core_quantize_on_gpu": round(1e3 / no_q, 1),
           "wall_views_per_s": round(n_views / wall, 1)}
    print(f"host-side stage 1, 1 core, {n_views} views ({args.images} images x {args.views} views), codec {args.codec}\n")
    print("| stage | ms/view |\n|---|---|")
    for k, v in per_view.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| **total** | **{total:.3f}** |")
    print(f"\nviews/s per core: {res['views_per_s_per_core']} (quantising on the CPU); "
          f"{res['views_per_s_per_core_quantize_on_gpu']} when the GPU quantises (CUDA builds)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
