#!/usr/bin/env bash
# The one prepared device check for stage 2 (and stage 1 on a GPU): in at most ~8 minutes on one
# GPU, install the carried wheels (no network there), then measure ViT-B/16 at 224 in bf16: the
# base-model forward alone, a stage-1 build, the loader, and training from the cache against
# online mode and targets in memory. `--tiny` runs the same steps with tiny sizes on CPU, so the
# script is known to work before it first meets a GPU.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: fills .whl/
#   bash benchmarks/gpu_check.sh             # there (device run with carry [".whl"])
#   bash benchmarks/gpu_check.sh --tiny      # anywhere, CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "${1:-}" = "--tiny" ]; then
  timeout 600 python3 benchmarks/bench_train.py --device cpu --steps 4 --warmup 1 --out "$OUTDIR/check_tiny.json"
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  timeout 420 python3 benchmarks/bench_train.py --arch vit_base_patch16_224 --base-depth 0 --model vit_base_patch16 \
    --img-size 224 --batch-size 128 --images 3072 --steps 12 --warmup 3 --num-workers 12 --device cuda \
    --out "$OUTDIR/gpu_vitb.json"
fi
