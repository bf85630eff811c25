#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels a bare PyTorch GPU image lacks (it has torch,
# timm, typer, rich, safetensors, numpy, pillow, pyyaml), into .whl/ for benchmarks/gpu_check.sh.
# Python 3.12, x86-64 manylinux, as that image.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  webdataset==1.0.2 braceexpand==0.1.7 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.7.1
ls -la .whl
