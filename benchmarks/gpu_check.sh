#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one short run (about 6-9 minutes on one H100/H200).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (needs a CUDA GPU; the CIFAR-10 copy at ../shared/data or
# DATA_ROOT for the data-path row). Prints everything and writes JSON files into OUT_DIR.
set -uo pipefail
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LAKD="python -m lakd"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
M=scratch,kd,catkd,lakd,lakd_joint
for bs in 64 256; do
  for amp in none bf16; do
    echo "== speed, batch $bs, amp $amp"
    $LAKD bench speed --device cuda --teacher resnet56 --student resnet20 --num-classes 100 --methods $M \
      --batch-size $bs --amp $amp --steps 50 --warmup 10 --rounds 2 --channels-last --json \
      | tee "$OUT/speed_b${bs}_${amp}.json"
    echo "== speed, batch $bs, amp $amp, contiguous (decides train.channels_last: auto on CUDA)"
    $LAKD bench speed --device cuda --teacher resnet56 --student resnet20 --num-classes 100 --methods scratch,kd,lakd \
      --batch-size $bs --amp $amp --steps 50 --warmup 10 --rounds 2 --json train.channels_last=false \
      | tee "$OUT/speed_b${bs}_${amp}_contiguous.json"
  done
  echo "== memory, batch $bs"
  $LAKD bench memory --device cuda --teacher resnet56 --student resnet20 --num-classes 100 \
    --methods scratch,kd,fitnet,catkd,lakd,lakd_joint,lakd_recompute --batch-size $bs --json | tee "$OUT/memory_b${bs}.json"
  $LAKD bench memory --device cuda --teacher resnet56 --student resnet20 --num-classes 100 \
    --methods scratch,lakd --batch-size $bs --json sdm.splits=[1,4,9] | tee "$OUT/memory_b${bs}_lakd149.json"
done
echo "== data path"
python benchmarks/bench_data.py --device cuda --root "${DATA_ROOT:-../shared/data}" --batch-sizes 64 256 \
  --images 51200 --repeats 3 --workers 8 --json | tee "$OUT/data.json"
echo "== one real epoch of LAKD resnet56->resnet20 at batch 64 (fast path, bf16, channels_last)"
$LAKD train configs/cifar10/lakd/resnet56_resnet20_149.yaml solver.epochs=1 train.amp=bf16 \
  train.channels_last=true device=cuda train.progress=false output_dir="$OUT/runs" 2>&1 | tail -3 | tee "$OUT/epoch.txt"
