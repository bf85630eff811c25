#!/usr/bin/env bash
# The one prepared device check for stage 2 (and stage 1 on a GPU): in at most ~8 minutes on one
# GPU, install the carried wheels (no network there), then measure ViT-B/16 at 224 in bf16: the
# base-model forward alone, a stage-1 build by both view paths (views/s against the bare forward,
# host CPU per view), the loader with pinning, training from the cache against online mode and
# targets in memory, one fine-tune slice, the largest ViT-B and ViT-L student batch, and the peak
# GPU memory of each. `--tiny` runs the same steps with tiny sizes on CPU, so the script is known
# to work before it first meets a GPU.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: fills .whl/
#   bash benchmarks/gpu_check.sh             # there (device run with carry [".whl"])
#   bash benchmarks/gpu_check.sh --tiny      # anywhere, CPU
#
# The tree travels to the device with the wheels under a 64 MiB cap that tests/data alone nearly
# fills: move tests/data aside for the call (the check does not read it), then put it back.
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
  timeout 600 python3 benchmarks/bench_gpu.py --tiny --out "$OUTDIR/check_tiny_extra.json"
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  # nccl itself, one rank (with one GPU the project's DDP paths stay alone; nccl refuses two ranks
  # on one device): the group starts, an all-reduce and a barrier go through.
  timeout 90 python3 -c "
import datetime, torch, torch.distributed as d
d.init_process_group('nccl', init_method='tcp://127.0.0.1:29533', rank=0, world_size=1,
                     timeout=datetime.timedelta(seconds=60), device_id=torch.device('cuda', 0))
t = torch.ones(4, device='cuda'); d.all_reduce(t); d.barrier()
print('nccl', torch.cuda.nccl.version(), 'all_reduce', t.tolist()); d.destroy_process_group()" \
    || echo "nccl check failed (rc $?)"
  timeout 280 python3 benchmarks/bench_train.py --arch vit_base_patch16_224 --base-depth 0 --model vit_base_patch16 \
    --img-size 224 --batch-size 128 --images 3072 --steps 12 --warmup 3 --num-workers 12 --device cuda \
    --out "$OUTDIR/gpu_vitb.json" || echo "bench_train failed or timed out (rc $?)"
  timeout 180 python3 benchmarks/bench_gpu.py --device cuda --images 3072 --batch-size 256 --num-workers 12 \
    --out "$OUTDIR/gpu_extra.json" || echo "bench_gpu failed or timed out (rc $?)"
fi
