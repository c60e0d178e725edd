#!/usr/bin/env bash
# Prepared for the next device session (issue 7): does NVIDIA MPS lift the ~9.5k samples/s cap of five
# processes time-slicing one GPU, now that training steps never wait for the GPU (DeepSMOTE anchors found on
# the CPU)? Same-call baselines first, then MPS, then the paper grid's GPU part with the better setting.
#   OUT=/tmp/out bash bench/device_next.sh        (about 8-9 minutes on an H200; 8 JSON files)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
T="python3 bench/train.py --device cuda --inner-val 0.2 --epochs 3"
timeout 60 $T --mode stack --concurrent 1 --json "$OUT/stack1.json"                    # fp32 + CUDA graphs
timeout 60 $T --mode stack --concurrent 1 --no-graphs --json "$OUT/stack1_nographs.json"
timeout 100 $T --mode stack --concurrent 5 --json "$OUT/stack5.json"
timeout 80 $T --mode member --concurrent 5 --json "$OUT/member5.json"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
MPS=""
if nvidia-cuda-mps-control -d; then
  MPS=1; echo "MPS daemon started"
  timeout 100 $T --mode stack --concurrent 5 --json "$OUT/stack5_mps.json"
  timeout 80 $T --mode member --concurrent 5 --json "$OUT/member5_mps.json"
else
  echo "MPS could not start here"
fi
BEST=$(python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
def rate(name):
    try:
        return json.loads((Path(sys.argv[1]) / name).read_text())["results"][0]["aggregate_samples_per_s"]
    except Exception:
        return 0.0
print("mps" if rate("stack5_mps.json") > rate("stack5.json") else "plain")
PY
)
if [ "$BEST" != "mps" ] && [ -n "$MPS" ]; then echo quit | nvidia-cuda-mps-control; fi
echo "paper grid with: $BEST"
date -u
timeout 240 python3 bench/train.py --device cuda --inner-val 0.2 --mode stack --epochs 40 --concurrent 5 --json "$OUT/grid40.json"
date -u
if [ "$BEST" = "mps" ]; then echo quit | nvidia-cuda-mps-control; fi
