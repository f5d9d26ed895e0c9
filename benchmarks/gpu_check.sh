#!/usr/bin/env bash
# The GPU figures of docs/performance.md and the GPU exactness check, in one run of at most BUDGET seconds
# (default 540; the sections want about 9-10 minutes on one H200, so the last ones, the epoch and the data path,
# already measured once, are the ones the budget cuts). Sections run in order of importance, each under a time limit cut to
# what is left of the budget, so a slow section costs the ones after it, never the whole run.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR] [BUDGET_S]
#   needs a CUDA GPU. Optional: DATA_ROOT (a folder holding cifar-10-batches-py) and TEACHER (a resnet56 CIFAR-10
#   checkpoint, mdistiller's layout or ours) for the real epoch and the data path; skipped without them.
# Everything printed also goes to OUT_DIR/log.txt; JSON goes to OUT_DIR/*.json, packed into OUT_DIR/gpu_check.tgz.
set -uo pipefail
OUT=${1:-gpu_check}
BUDGET=${2:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
LAKD="python -m lakd"
SECONDS=0

# section NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, what is left of the budget - 20 s) seconds;
# its own lines go to stderr, so that a section whose stdout is redirected to a JSON file leaves the file pure JSON
section() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 20))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then echo "== SKIPPED (budget): $name" >&2; return; fi
  echo "== [$SECONDS s] $name (limit ${limit} s)" >&2
  timeout -k 5 "$limit" "$@"
  local rc=$?
  (( rc == 124 || rc == 137 )) && echo "== TIMED OUT: $name" >&2
  (( rc != 0 && rc != 124 && rc != 137 )) && echo "== FAILED (rc $rc): $name" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', \
torchvision.__version__, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"

# 1. training-step speed, resnet56 -> resnet20, 100 classes (the bench's convention), fp32 and bf16,
#    channels_last (all five) and contiguous (three: decides train.channels_last: auto on CUDA)
M=scratch,kd,catkd,lakd,lakd_joint
for bs in 256 64; do
  for amp in none bf16; do
    section "speed b$bs $amp channels_last" 60 $LAKD bench speed --device cuda --teacher resnet56 --student resnet20 \
      --num-classes 100 --methods $M --batch-size $bs --amp $amp --steps 20 --warmup 5 --rounds 2 --channels-last \
      --json > "$OUT/speed_b${bs}_${amp}.json"
    cat "$OUT/speed_b${bs}_${amp}.json" 2>/dev/null; echo
    section "speed b$bs $amp contiguous" 45 $LAKD bench speed --device cuda --teacher resnet56 --student resnet20 \
      --num-classes 100 --methods scratch,lakd --batch-size $bs --amp $amp --steps 20 --warmup 5 --rounds 2 \
      --json train.channels_last=false > "$OUT/speed_b${bs}_${amp}_contiguous.json"
    cat "$OUT/speed_b${bs}_${amp}_contiguous.json" 2>/dev/null; echo
  done
done

# 1b. ImageNet-size models (torchvision-layout resnet34 -> resnet18, 224 px, 1000 classes), fp32 and bf16, both
#     layouts: whether train.amp / train.channels_last: auto may turn on for that family on CUDA (BF16_FASTER,
#     the layout default); the CIFAR ResNets above were no faster with either on an H200
for amp in none bf16; do
  section "speed imagenet b64 $amp channels_last" 60 $LAKD bench speed --device cuda --teacher resnet34 \
    --student resnet18 --num-classes 1000 --methods scratch,kd,lakd --batch-size 64 --amp $amp --steps 20 --warmup 5 \
    --rounds 2 --channels-last --json > "$OUT/speed_imagenet_b64_${amp}.json"
  cat "$OUT/speed_imagenet_b64_${amp}.json" 2>/dev/null; echo
  section "speed imagenet b64 $amp contiguous" 60 $LAKD bench speed --device cuda --teacher resnet34 \
    --student resnet18 --num-classes 1000 --methods scratch,kd,lakd --batch-size 64 --amp $amp --steps 20 --warmup 5 \
    --rounds 2 --json train.channels_last=false > "$OUT/speed_imagenet_b64_${amp}_contiguous.json"
  cat "$OUT/speed_imagenet_b64_${amp}_contiguous.json" 2>/dev/null; echo
done

# 2. every method on CUDA: trains, repeats bitwise with train.deterministic=true, resumes exactly
section "exactness, every method, fp32" 120 python benchmarks/gpu_exact.py --device cuda --methods all \
  --amp none --json "$OUT/exact.json"
section "exactness, LAKD and CAT-KD, bf16 and fp16 (GradScaler)" 45 python benchmarks/gpu_exact.py --device cuda \
  --methods lakd,catkd --amp bf16,fp16 --json "$OUT/exact_amp.json"

# 3. peak memory of a training step (Table 4), one fresh process per method
for bs in 64 256; do
  MM=scratch,kd,fitnet,catkd,lakd,lakd_joint,lakd_recompute; (( bs == 256 )) && MM=scratch,catkd,lakd,lakd_recompute
  section "memory b$bs" 130 $LAKD bench memory --device cuda --teacher resnet56 --student resnet20 --num-classes 100 \
    --methods $MM --batch-size $bs --json > "$OUT/memory_b${bs}.json"
  cat "$OUT/memory_b${bs}.json" 2>/dev/null; echo
done
section "memory b64 lakd [1,4,9]" 40 $LAKD bench memory --device cuda --teacher resnet56 --student resnet20 \
  --num-classes 100 --methods scratch,lakd --batch-size 64 --json sdm.splits=[1,4,9] > "$OUT/memory_b64_lakd149.json"
cat "$OUT/memory_b64_lakd149.json" 2>/dev/null; echo

# 3b. what is alive at the CUDA peak (the allocator's history over one step): why every method without local
#     backward peaks at scratch's bytes, and LAKD [3,6,9] 5% above it (docs/performance.md)
section "memory peak breakdown b64" 90 python benchmarks/gpu_memory_peak.py --methods scratch,fitnet,lakd \
  --batch-size 64 --json "$OUT/memory_peak_b64.json"

# 4. one real CIFAR-10 epoch end to end (data, teacher, LAKD [1,4,9], evaluation), batch 64, bf16 and fp32
if [[ -n "${DATA_ROOT:-}" && -n "${TEACHER:-}" ]]; then
  for amp in bf16 none; do
    section "one epoch, LAKD [1,4,9], batch 64, amp $amp" 90 $LAKD train configs/cifar10/lakd/resnet56_resnet20_149.yaml \
      solver.epochs=1 train.amp=$amp device=cuda data.root="$DATA_ROOT" train.progress=false teacher.checkpoint="$TEACHER" \
      output_dir="$OUT/runs_$amp"
  done
  # 5. the data path on the GPU: lakd's fast path vs DataLoader pipelines
  section "data path" 60 python benchmarks/bench_data.py --device cuda --root "$DATA_ROOT" --batch-sizes 64 256 \
    --images 51200 --repeats 3 --workers 8 --json > "$OUT/data.json"
  cat "$OUT/data.json" 2>/dev/null; echo
else
  echo "== SKIPPED (DATA_ROOT and TEACHER unset): one epoch, data path"
fi

echo "== [$SECONDS s] done"
rm -rf "$OUT"/runs_*/*/*.pt "$OUT"/runs_*/*/tb "$OUT"/runs_*/*/.lock
(cd "$OUT" && tar czf gpu_check.tgz --exclude gpu_check.tgz --exclude log.txt . 2>/dev/null)
ls "$OUT"
