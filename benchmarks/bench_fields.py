"""What zstd buys on each target field against what it costs, per codec: the measurement behind
each codec's per-field ``compress`` flags (tec_cache.core.codecs).

Where it sits: codec.encode --> per-view fields --> (zstd per field, in the shard writer) --> shard
--> (zstd decode, in the stage-2 loader). For every field of every codec, on ViT-B-shaped targets
of a random-weight ViT-B over real photos (benchmarks/vitb_targets.py): raw bytes per view, bytes
after zstd at the cache's level, and the ms per view that zstd adds when writing and reading.
One thread.

    python benchmarks/bench_fields.py --out benchmarks/results/fields.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numcodecs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vitb_targets import DEFAULT_TARGETS_CACHE, vitb_views_and_targets
from tec_cache.build.config import DEFAULT_COMPRESSOR
from tec_cache.core.codecs import CODECS, TargetShape, split_fields
from tec_cache.format.schema import parse_compressor

VIT_B = TargetShape(196, 768, 12, 15)


def _ms(fn, items: list, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(items) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", type=int, default=parse_compressor(DEFAULT_COMPRESSOR), help="zstd level (default: the builds')")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats; the fastest is kept")
    ap.add_argument("--targets-cache", type=Path, default=DEFAULT_TARGETS_CACHE)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, feat, att, idx = vitb_views_and_targets(32, args.targets_cache)
    zstd = numcodecs.Zstd(level=args.level)
    rows = []
    print(f"zstd level {args.level}, {len(feat)} ViT-B views, 1 thread\n")
    print("| codec | field | raw B/view | zstd B/view | saved | write ms/view | read ms/view | stored |")
    print("|---|---|---|---|---|---|---|---|")
    for name, codec in CODECS.items():
        specs = codec.field_specs(VIT_B)
        views = split_fields(codec.encode(feat, att, idx))
        for field, spec in specs.items():
            raws = [np.ascontiguousarray(v[field]).tobytes() for v in views]
            frames = [zstd.encode(r) for r in raws]
            out = np.empty(spec.nbytes(), np.uint8)
            write = _ms(zstd.encode, raws, args.repeats)
            read = _ms(partial(zstd.decode, out=out), frames, args.repeats)
            raw_b, z_b = float(np.mean([len(r) for r in raws])), float(np.mean([len(f) for f in frames]))
            row = {"codec": name, "field": field, "raw_bytes": raw_b, "zstd_bytes": z_b,
                   "saved_fraction": round(1 - z_b / raw_b, 4), "write_ms": round(write, 4), "read_ms": round(read, 4),
                   "stored": "zstd" if spec.compress else "raw"}
            rows.append(row)
            print(f"| {name} | {field} | {raw_b:.0f} | {z_b:.0f} | {row['saved_fraction']:.1%} | {write:.3f} | "
                  f"{read:.3f} | {row['stored']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"level": args.level, "views": len(feat), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
