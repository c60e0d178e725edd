#!/usr/bin/env bash
# Second device call of issue 7: CUDA-graph parity, one stacked fold (3 seeds), then the GPU part of the
# paper grid (5 fold trials x 3 stacked seeds x 40 epochs at once), with graphs, fused Adam and one-pass
# augmentation.   OUT=/tmp/out bash bench/device_graphs.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
timeout 45 python3 bench/graph_parity.py --device cuda --json "$OUT/graph_parity.json"
T="python3 bench/train.py --device cuda --inner-val 0.2"
timeout 40 $T --mode stack --epochs 2 --concurrent 1 --json "$OUT/stack1_graphs.json"
date -u
timeout 175 $T --mode stack --epochs 40 --concurrent 5 --json "$OUT/grid40_graphs.json"
date -u
