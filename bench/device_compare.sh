#!/usr/bin/env bash
# Issue 14, item 7, prepared for a session with a GPU (not run yet: no device was lent to the session that wrote
# it). All 7 methods of the paper's Tables 2 and 3 at paper width, the paper's recipe (platform/experiments/
# comparison.yaml: Adam 1e-4, steps at 50/70/90% of 40 epochs, batch 64), 5 folds x 1 seed, on a 172-subject
# synthetic cohort (about 4,000 lesions, 4-5% rim+, difficulty 0.5), without Ray (bench/compare.py). Prints the
# table bench/RESULTS.md keeps and writes it with the per-method figures to $OUT/comparison.json.
#   OUT=/tmp/out bash bench/device_compare.sh
# Budget (extrapolated, not measured): features ~2 min on 16 cores; the CNNs at paper width ~40-60 s each per fold
# on an H100 (bench/RESULTS.md: ~5k samples/s for one member at batch 64, 3,300 rows x 40 epochs), so ~20-25 min
# for all 7: more than one 10-minute call. Run it in parts with MODELS=..., each with its own timeout, the
# run folder resumes (finished members are skipped):
#   MODELS="aprl-rf aprl-nn qsmrimnet" bash bench/device_compare.sh; MODELS="image-radiomics image-channel" ...
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/device_compare}
RUN=${RUN:-runs/compare172}
MODELS=${MODELS:-qsmrimnet image-channel image-rimnet image-radiomics rimnet aprl-rf aprl-nn}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
python3 bench/compare.py --subjects 172 --epochs 40 --seeds 0 --base-channels 64 --models $MODELS \
  --set training.device=cuda --set 'model_overrides={aprl-rf: {n_estimators: 500}}' --out "$RUN" | tee "$OUT/table.txt"
cp "$RUN/comparison.json" "$OUT/comparison.json" 2>/dev/null
date -u
