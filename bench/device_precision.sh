#!/usr/bin/env bash
# Issue 18, item 4: prepared for a session with a GPU (not run yet: no device was lent to the session that wrote
# it). One call of at most 8 minutes, in the order; each figure is printed as soon as it exists and the
# JSON files land in $OUT, so a killed call still returns what it measured:
#   1. the 40-epoch paper grid (5 fold trials x 3 stacked seeds at once, checkpoints every 10 epochs as
#      paper.yaml writes them, inner validation 0.2) with one trial's start-up: the wall time of the whole
#      process (imports, CUDA init, data, fits) against the 150 s target, and bench/train.py's own figures;
#   2. ORT CUDA p50/p99 per lesion for the paper-size 15-member ensemble at batch 1 and 25, fp32 and fp16,
#      against 20 ms p99; 3. CUDA-vs-CPU parity on the same 200 lesions (max prob diff, vote flips, rim flips).
# The device image's onnxruntime is the CPU build (KINDS.md) and onnxruntime-gpu's wheel is larger than a call
# may carry: then step 2 says so and times the members in PyTorch on CUDA instead, labelled as such.
#   OUT=/tmp/out bash bench/device_precision.sh        (budget: ~200 s + ~150 s + start-up)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device_precision}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
date -u
T0=$(date +%s.%N)
timeout 230 python3 bench/train.py --device cuda --inner-val 0.2 --epochs 40 --checkpoint-every 10 \
  --mode stack --concurrent 5 --json "$OUT/grid40.json"
T1=$(date +%s.%N)
python3 -c "import sys; w=float(sys.argv[2])-float(sys.argv[1]); print(f'paper grid, 40 epochs, start-up included: {w:.0f} s wall (target 150 s)')" "$T0" "$T1" | tee "$OUT/grid40_wall.txt"
date -u
timeout 200 python3 bench/quant_cuda.py --members 15 --reps 200 --parity-lesions 200 --json "$OUT/ort_cuda.json"
date -u
