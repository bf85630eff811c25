"""The newcomer's main job: a small real pipeline on CPU, Fashion-MNIST -> verified cache -> trained
TEC student -> exported timm ViT.

    python scripts/demo.py [--out demo-out] [--images 2000] [--fashion-mnist DIR]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tec_cache.fashion_mnist import DEFAULT_DIR, HOW_TO_GET, export_image_folder  # noqa: E402

ARCH = ["--arch", "vit_tiny_patch16_224", "--depth", "6", "--img-size", "32", "--patch-size", "4", "--topk", "8"]


def run(*args: str) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    subprocess.run(list(args), check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fashion-mnist", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    try:
        data = export_image_folder(args.out / "fmnist-train", "train", n=args.images, root=args.fashion_mnist)
    except FileNotFoundError:
        sys.exit(f"error: {HOW_TO_GET}")
    base = args.out / "base-tiny.pth"
    if not base.exists():
        import timm

        # No pretrained weights can be fetched offline: the demo's base model is a random-weight
        # tiny ViT saved in the MAE release layout, which exercises every step of the pipeline.
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4, depth=6)
        torch.save({"model": model.state_dict()}, base)
    cache = args.out / "cache"
    tc = [sys.executable, "-m", "tec_cache"]
    run(*tc, "build", "--data", str(data), "--checkpoint", str(base), "--out", str(cache), *ARCH,
        "--views", str(args.views), "--codec", "int8", "--shard-size", "500", "--batch-size", "128",
        "--num-workers", "2", "--device", "cpu")
    run(*tc, "inspect", str(cache))
    run(*tc, "verify", str(cache))
    tt = [sys.executable, "-m", "tec_train"]
    run_dir = args.out / "run-tiny"
    run(*tt, "run", "--cache", str(cache), "--run-dir", str(run_dir), "--model", "vit_tiny_patch4", "--depth", "6",
        "--epochs", str(args.epochs), "--warmup-epochs", "1", "--batch-size", "64", "--blr", "1.5e-3",
        "--num-workers", "1", "--log-every", "10", "--device", "cpu")
    run(*tt, "export", str(run_dir), "--out", str(args.out / "export"))


if __name__ == "__main__":
    main()
