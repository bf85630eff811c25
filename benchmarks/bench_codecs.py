"""Bytes per view and fidelity of each target codec on ViT-B-shaped targets (issue: stage 1).

Writes real shards of both formats with the project's writers and reports, per codec:
target bytes per view (compressed fields, as stored), whole-view bytes per shard format (JPEG
and container overhead included), and fidelity (feature cosine after the loss's token-axis
normalisation, raw feature cosine, KL of softmax(logits/tau) at tau 1.8).

    python benchmarks/bench_codecs.py --views 32 --out benchmarks/results/codecs.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.vitb_targets import vitb_views_and_targets
from tec_cache import format as cache_format
from tec_cache.build.config import DEFAULT_COMPRESSOR
from tec_cache.core.codecs import CODECS, TargetShape, fidelity, get_codec, split_fields
from tec_cache.format.schema import ViewRecord, record_key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--tau", type=float, default=1.8)
    ap.add_argument("--compressor", default=DEFAULT_COMPRESSOR)
    ap.add_argument("--targets-cache", type=Path, default=Path(tempfile.gettempdir()) / "tec_bench_vitb_targets.pt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    jpegs, feat, att, idx = vitb_views_and_targets(args.views, args.targets_cache)
    shape = TargetShape(196, 768, 12, 15)
    z = numcodecs.Zstd(level=int(args.compressor.split(":")[1]))
    rows: list[dict[str, Any]] = []
    for name in CODECS:
        codec = get_codec(name)
        specs = codec.field_specs(shape)
        per_view = split_fields(codec.encode(feat, att, idx))
        raw = sum(s.nbytes() for s in specs.values())
        stored = float(np.mean([sum(len(z.encode(np.ascontiguousarray(a).tobytes())) for a in v.values()) for v in per_view]))
        row = {"codec": name, "raw_target_bytes": raw, "stored_target_bytes": round(stored, 1),
               "jpeg_bytes": round(float(np.mean([len(j) for j in jpegs])), 1)}
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in cache_format.FORMATS:
                path = Path(tmp) / f"s{cache_format.get_format(fmt).suffix}"
                with cache_format.open_writer(fmt, path, specs, args.compressor) as w:
                    for i, fields in enumerate(per_view):
                        w.write(ViewRecord(record_key(i), i, 0, -1, f"img{i}", jpegs[i], fields))
                    info = w.close()
                row[f"{fmt}_bytes_per_view"] = round(info.nbytes / len(per_view), 1)
        row.update({k: float(v) for k, v in fidelity(codec, feat, att, idx, args.tau).items()})
        rows.append(row)
    fp16, int8, coarse = rows
    summary = {"views": len(jpegs), "int8_over_fp16_stored_targets": int8["stored_target_bytes"] / fp16["stored_target_bytes"],
               "int8_over_fp16_webdataset_view": int8["webdataset_bytes_per_view"] / fp16["webdataset_bytes_per_view"],
               "coarse_over_int8_webdataset_view": coarse["webdataset_bytes_per_view"] / int8["webdataset_bytes_per_view"],
               # What a cache of ImageNet-1k (1,281,167 images) takes per view-epoch, in TB.
               "imagenet_tb_per_view_epoch": {r["codec"]: r["webdataset_bytes_per_view"] * 1_281_167 / 1e12 for r in rows}}
    print(f"ViT-B/16 targets (random weights, {len(jpegs)} real-photo views, L=196 D=768 H=12 k=15, {args.compressor})\n")
    print("| codec | raw target B | stored target B | webdataset B/view | zarr B/view | feature cosine (loss-normalised) | raw cosine | att KL (tau 1.8) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['raw_target_bytes']:,} | {r['stored_target_bytes']:,.0f} | {r['webdataset_bytes_per_view']:,.0f} | "
              f"{r['zarr_bytes_per_view']:,.0f} | {r['feature_cosine']:.6f} | {r['feature_cosine_raw']:.6f} | {r['att_kl']:.2e} |")
    print(f"\nint8 / fp16 stored target bytes: {summary['int8_over_fp16_stored_targets']:.3f}; "
          f"whole view (webdataset, JPEG included): {summary['int8_over_fp16_webdataset_view']:.3f}; "
          f"int8-coarse / int8 whole view: {summary['coarse_over_int8_webdataset_view']:.3f}")
    print("ImageNet-1k, TB per view-epoch: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["imagenet_tb_per_view_epoch"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
