#!/usr/bin/env bash
# Prepared for the next device session (issue 7), all fp32 (the grid's default) with CUDA graphs unless noted.
# The figure that decides the issue comes first, the diagnostics after it (a killed call still returns $OUT):
# 0. parity on the GPU: graphed against eager stacked fits, stacked fits against fit_member;
# 1. five fold trials at once (the default grid) and one process stacking all 15 members (grid.stack_folds),
#    3 epochs each;  2. the paper grid's GPU part (40 epochs, resume checkpoints every 10 as paper.yaml) with
#    the faster of the two;
# 3. diagnostics: one fold's stack with and without CUDA graphs, the 15-member stack in channels_last_3d,
#    the five fold trials under NVIDIA MPS.
#   OUT=/tmp/out bash bench/device_next.sh        (about 8 minutes on an H200; 8 JSON files)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
timeout 70 python3 bench/graph_parity.py --device cuda --json "$OUT/parity.json"
T="python3 bench/train.py --device cuda --inner-val 0.2 --epochs 3"
timeout 70 $T --mode stack --concurrent 5 --json "$OUT/stack5.json"
timeout 70 $T --mode model --concurrent 1 --json "$OUT/model1.json"
BEST=$(python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
def rate(name):
    try:
        return json.loads((Path(sys.argv[1]) / name).read_text())["results"][0]["aggregate_samples_per_s"]
    except Exception:
        return 0.0
rates = {"stack": rate("stack5.json"), "model": rate("model1.json")}
print(max(rates, key=rates.get))
PY
)
echo "paper grid with: $BEST"
date -u
G="python3 bench/train.py --device cuda --inner-val 0.2 --epochs 40 --checkpoint-every 10 --json $OUT/grid40.json"
case "$BEST" in
  model) timeout 200 $G --mode model --concurrent 1 ;;
  *) timeout 200 $G --mode stack --concurrent 5 ;;
esac
date -u
timeout 50 $T --mode stack --concurrent 1 --json "$OUT/stack1.json"
timeout 50 $T --mode stack --concurrent 1 --no-graphs --json "$OUT/stack1_nographs.json"
timeout 70 $T --mode model --concurrent 1 --channels-last --json "$OUT/model1_cl.json"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then
  echo "MPS daemon started"
  timeout 70 $T --mode stack --concurrent 5 --json "$OUT/stack5_mps.json"
  echo quit | nvidia-cuda-mps-control
else
  echo "MPS could not start here"
fi
date -u
