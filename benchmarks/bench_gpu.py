"""What the GPU check measures besides the training-mode rates (bench_train.py): the stage-1 build
by both view paths against the bare base-model forward, one fine-tune slice, and the largest
student batch that fits.

Where it sits: it drives the project's own library calls (``build_cache``, ``finetune``, the TEC
student's forward and AdamW step) as the commands do, and reads their own records (the manifest's
build statistics, ``metrics.jsonl``). Every stage reports its peak device memory. Runs on CPU with
tiny sizes (``--tiny``, to know the script works before it meets a GPU) and on one GPU with
ViT-B/16 at 224 in bf16:

    python benchmarks/bench_gpu.py --tiny --out /tmp/gpu_tiny.json            # CPU, a minute
    python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu_extra.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from timm.layers import Attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train import forward_rate, make_images, so_far, sync  # the same images, timer and progress
from tec_cache.build.builder import BuildConfig, build_cache
from tec_cache.core.basemodels import build_model, resolve_spec
from tec_cache.format.manifest import load_manifest
from tec_train.finetune import FinetuneConfig, finetune
from tec_train.student import build_student, param_groups


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the build's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float | None]:
    """fn()'s result and the peak device memory it allocated, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync()
    return out, torch.cuda.max_memory_allocated(device) / 2**30


def build_paths(work: Path, data: Path, n_img: int, spec: Any, ckpt: Path, device: torch.device, batch: int,
                workers: int, paths: list[str]) -> dict[str, Any]:
    """One stage-1 build per view path: views/s, host CPU seconds per view, where views were cut and
    decoded (the manifest's build record), and peak device memory."""
    res: dict[str, Any] = {}
    for path in paths:
        out = work / f"cache-{path}"
        cfg = BuildConfig(data=data, out=out, checkpoint=ckpt, spec=spec, views=1, shard_size=256, batch_size=batch,
                          num_workers=workers, device=str(device), view_device=path)
        c0, t0 = cpu_seconds(), time.perf_counter()
        _, peak = peak_memory(device, partial(build_cache, cfg))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        stats = load_manifest(out).stats
        assert stats is not None  # a cache this build just wrote records its stats
        build = dict(stats.build or {})
        res[path] = {"views_per_s": n_img / wall, "host_cpu_ms_per_view": 1000 * cpu / n_img,
                     "host_cores_at_this_rate": cpu / wall, "peak_gib": peak,
                     "cut_on": build.get("views_cut_on"), "decoded_on": build.get("views_decoded_on")}
    return res


def finetune_slice(work: Path, images: Path, ckpt: Path, arch: str, img_size: int, batch: int,
                   n_train: int, device: torch.device, workers: int) -> dict[str, Any]:
    """One fine-tuning epoch over n_train images (two classes) from the base weights, in the
    command's own precision (bf16 on CUDA): images/s from its metrics, peak device memory."""
    root = work / "labelled"
    for split, n in (("train", n_train), ("val", max(2, n_train // 8))):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i, src in enumerate(sorted((images / "c").iterdir())[c::2][: n // 2]):
                (d / f"{i:05d}.jpg").write_bytes(src.read_bytes())
    cfg = FinetuneConfig(run_dir=str(work / "finetune"), source=str(ckpt), arch=arch, data=str(root), epochs=1,
                         warmup_epochs=0.0, batch_size=batch, num_workers=workers, device=str(device),
                         img_size=img_size)
    t0 = time.perf_counter()
    result, peak = peak_memory(device, lambda: finetune(cfg))
    recs = [json.loads(x) for x in (work / "finetune" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in recs if "images_per_s" in r]
    return {"images": n_train, "wall_s": time.perf_counter() - t0, "images_per_s": rates[-1] if rates else None,
            "top1": result.to_json().get("best_top1"), "peak_gib": peak}


def student_step_fits(model_name: str, batch: int, img_size: int, pred_dim: int, heads: int, topk: int,
                      device: torch.device, depth: int | None) -> bool:
    """One bf16 (CUDA) / fp32 (CPU) TEC training step at this batch: True when it fits in memory."""
    extra = {"depth": depth} if depth else {}
    model = build_student(model_name, pred_dim=pred_dim, att_heads=heads, img_size=img_size, **extra).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    L = model.num_patches
    try:
        imgs = torch.randn(batch, 3, img_size, img_size, device=device)  # [B, 3, H, W]
        feat = torch.randn(batch, L, pred_dim, device=device)  # [B, L, D]
        att = torch.randn(batch, topk + 1, heads, L, device=device)  # [B, k+1, H, L]
        idx = torch.stack([torch.randperm(L, device=device)[:topk] for _ in range(batch)])  # [B, k]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(imgs, feat, att, idx)
        out.loss.backward()
        opt.step()
        sync()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(model_name: str, start: int, limit: int, **kw: Any) -> int:
    """Largest batch (doubling, then bisection) whose step fits; 0 when even ``start`` does not."""
    lo, hi = 0, start
    while hi <= limit and student_step_fits(model_name, hi, **kw):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > max(1, lo // 16):  # to within 1/16 of the answer: enough to size a run
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if student_step_fits(model_name, mid, **kw) else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: the script's own check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=3072, help="source images for the builds (one view each)")
    ap.add_argument("--batch-size", type=int, default=256, help="build batch")
    ap.add_argument("--num-workers", type=int, default=12)
    ap.add_argument("--finetune-images", type=int, default=2048)
    ap.add_argument("--finetune-batch", type=int, default=128)
    ap.add_argument("--students", nargs="+", default=["vit_base_patch16", "vit_large_patch16"])
    ap.add_argument("--max-batch", type=int, default=4096, help="search bound for the largest batch")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.tiny:
        args.device, args.images, args.batch_size, args.num_workers = "cpu", 48, 16, 2
        args.finetune_images, args.finetune_batch, args.max_batch = 32, 8, 16
        # Full depth: fine-tuning from base weights takes the arch's own depth.
        arch, img, topk, student_depth = "vit_tiny_patch16_224", 64, 3, 2
        args.students = ["vit_tiny_patch16"]
    else:
        arch, img, topk, student_depth = "vit_base_patch16_224", 224, 15, None
    device = torch.device(args.device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tec_bench_gpu_"))
    spec = resolve_spec(None, arch=arch, img_size=img, patch_size=16, topk=topk)
    torch.manual_seed(0)
    base = build_model(spec)
    ckpt = work / "base.pth"
    torch.save({"model": base.state_dict()}, ckpt)
    data = make_images(work / "images", args.images)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "arch": arch, "img_size": img, "images": args.images}

    def forward() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return forward_rate(base.to(device).eval(), spec, args.batch_size, device)

    res["base_forward_views_per_s"], res["base_forward_peak_gib"] = peak_memory(device, forward)
    base.cpu()
    so_far(res)
    paths = ["workers", "device"]
    res["build"] = build_paths(work, data, args.images, spec, ckpt, device, args.batch_size, args.num_workers, paths)
    for p in paths:
        res["build"][p]["over_bare_forward"] = res["build"][p]["views_per_s"] / res["base_forward_views_per_s"]
    so_far(res)
    res["finetune"] = finetune_slice(work, data, ckpt, arch, img, args.finetune_batch, args.finetune_images,
                                     device, args.num_workers)
    so_far(res)
    res["largest_batch"] = {}
    dim, heads = int(base.embed_dim), int(cast(Attention, base.blocks[-1].attn).num_heads)  # the targets' D and H size the heads
    for name in args.students:
        t0 = time.perf_counter()
        res["largest_batch"][name] = {
            "batch": largest_batch(name, 8, args.max_batch, img_size=img, pred_dim=dim, heads=heads,
                                   topk=topk, device=device, depth=student_depth),
            "search_s": time.perf_counter() - t0}
        so_far(res)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
