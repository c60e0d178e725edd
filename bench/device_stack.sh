#!/usr/bin/env bash
# One device call (GPU machine, no Ray there): stacked-step throughput, then fit_member against fit_members in
# the same run, then the GPU part of the paper grid (5 fold trials x 3 stacked seeds x 40 epochs at once).
#   OUT=/tmp/out bash bench/device_stack.sh      (on the device: $OUT is set by the tool)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
date -u
T="python3 bench/train.py --device cuda --inner-val 0.2"
timeout 150 python3 bench/stack_step.py --groups 1 3 5 15 --steps 20 --json "$OUT/stack_step.json"
timeout 90 $T --mode member --epochs 3 --concurrent 1 --json "$OUT/member1.json"
timeout 100 $T --mode member --epochs 3 --concurrent 5 --json "$OUT/member5.json"
timeout 90 $T --mode stack --epochs 3 --concurrent 1 --json "$OUT/stack1.json"
timeout 100 $T --mode stack --epochs 3 --concurrent 5 --json "$OUT/stack5.json"
timeout 100 $T --mode stack --epochs 3 --concurrent 5 --channels-last --json "$OUT/stack5_cl.json"
CL=$(python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    a = json.loads((out / "stack5.json").read_text())["results"][0]["aggregate_samples_per_s"]
    b = json.loads((out / "stack5_cl.json").read_text())["results"][0]["aggregate_samples_per_s"]
    print("--channels-last" if b > a else "")
except Exception:
    print("")
PY
)
echo "paper grid run with: ${CL:-contiguous}"
date -u
timeout 300 $T --mode stack --epochs 40 --concurrent 5 $CL --json "$OUT/grid40.json"
date -u
