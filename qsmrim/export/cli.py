"""``qsmrim export RUN --out model.onnx [--precision fp32|fp16|int8] [--register] [--force] [--model NAME] ...``.

Kept out of ``qsmrim/cli.py`` so the export glue lives with the exporter; the main CLI mounts it with
``add_export_parser(sub)``. The importable function behind the command (same parameter names) is
:func:`qsmrim.export.run.export_run`, re-exported here with its helpers for older imports.
"""

from __future__ import annotations

import argparse
from typing import Any

from qsmrim.export.precision import INT8_FORMATS, INT8_METHODS, PrecisionConfig
from qsmrim.export.run import cv_metrics_of_run, evaluation_of_run, export_run, oof_inputs, screening_of_run
from qsmrim.onnx_runtime import DEFAULT_MAX_RIM_FLIP_SHARE, PRECISIONS

__all__ = [
    "add_export_parser",
    "cmd_export",
    "cv_metrics_of_run",
    "evaluation_of_run",
    "export_run",
    "oof_inputs",
    "screening_of_run",
]


def cmd_export(args: argparse.Namespace) -> int:
    config = PrecisionConfig(int8_method=args.int8_method, int8_format=args.int8_format,
                             calibration_rows=args.calibration_rows)  # fmt: skip
    res = export_run(args.run, args.out, register=args.register, force=args.force, model=args.model,
                     protocol=args.protocol, fp16=args.fp16, external_data=True if args.external_data else None,
                     tracking_uri=args.tracking_uri, name=args.name, precision=args.precision,
                     precision_config=config, max_rim_flip_share=args.max_rim_flip_share,
                     threads=args.threads)  # fmt: skip
    side = res["sidecar_content"]
    files = side["onnx"]["files"]
    size = sum(f["bytes"] for f in files.values())
    print(f"wrote {res['onnx']} ({side['n_members']} {side['model']} member(s), {size / 1e6:.1f} MB"
          f"{', weights in ' + files['external_data']['name'] if 'external_data' in files else ''}) and {res['sidecar']}")  # fmt: skip
    parity = side.get("parity") or {}
    if parity:
        print(f"  parity with torch: max |prob diff| {parity['max_prob_diff']:.2g} (atol {parity['atol']:g})")
    prec = side.get("precision") or {}
    if prec.get("parity"):
        q = prec["parity"]
        auc = "n/a" if q["cv_pr_auc"] is None else f"{q['cv_pr_auc']:.4f} vs {q['cv_pr_auc_fp32']:.4f} fp32"
        print(f"  {prec['name']} vs fp32 on {q['lesions']} out-of-fold lesions: max |prob diff| {q['max_prob_diff']:.2g}, "
              f"{q['vote_flips']} vote flip(s), {q['rim_flips']} rim-call flip(s) ({q['rim_flip_share']:.2%}), "
              f"CV PR AUC {auc}")  # fmt: skip
    screening = side.get("screening")
    if screening:
        print(f"  screening threshold {screening['threshold']:.4g}: CV sensitivity {screening['sensitivity']:.3f}, "
              f"{screening['lesions_to_review']} of {screening['n_lesions']} lesions to review")  # fmt: skip
    else:
        print("  no screening threshold (no CV high-sensitivity point): serving flags review by the rim call")
    reg = res.get("registry")
    if reg:
        from qsmrim.tracking.registry import describe_promotion

        print(f"registered {reg['model_uri']} (run {reg['run_id']}) in {res['tracking_uri']}")
        if reg.get("promotion"):
            print(f"  {describe_promotion(reg['promotion'])}")
    return 0


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` command to ``qsmrim``'s subparsers; returns the new parser."""
    s = subparsers.add_parser(
        "export", help="export a run's ensemble to one ONNX graph (+ model.json); optionally register it"
    )
    s.add_argument("run", help="run folder (<run>/<model>/fold_<k>/seed_<s>/)")
    s.add_argument("--out", required=True, help="output .onnx (the sidecar goes to <stem>.json beside it)")
    s.add_argument("--register", action="store_true", help="log to MLflow, register a version and promote @champion "
                   "if its CV PR AUC is at least the champion's")  # fmt: skip
    s.add_argument(
        "--force", action="store_true", help="with --register: move @champion even if the CV PR AUC is lower"
    )
    s.add_argument(
        "--model", help="which trained model of the run (default: its only one, else the config's first)"
    )
    s.add_argument(
        "--protocol", choices=("paper", "honest"), default="paper", help="which member thresholds vote"
    )
    s.add_argument(
        "--fp16",
        action="store_true",
        help="store the fp32 graph's weights as float16 (half the size, parity ~1e-3, computed in float32); --precision fp16 computes in float16",
    )
    s.add_argument("--external-data", action="store_true", help="weights in <out>.data even below 2 GB")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="also write <stem>.<precision>.onnx (fp16 for GPUs, int8 for CPU nodes) checked against fp32 "
                   "on the run's out-of-fold lesions; --register then registers that graph")  # fmt: skip
    s.add_argument("--int8-method", choices=INT8_METHODS, default="static",
                   help="static: calibrated on training lesions (default); dynamic: slower on CPU for Conv3d")  # fmt: skip
    s.add_argument("--int8-format", choices=INT8_FORMATS, default="qoperator",
                   help="static int8 as QLinearConv operators (default) or Q/DQ pairs")  # fmt: skip
    s.add_argument("--calibration-rows", type=int, default=PrecisionConfig.calibration_rows,
                   help="training lesions that calibrate static int8")  # fmt: skip
    s.add_argument("--max-rim-flip-share", type=float, default=DEFAULT_MAX_RIM_FLIP_SHARE,
                   help="with --register: refuse a fp16/int8 graph whose rim calls differ from fp32 on more than "
                   "this share of out-of-fold lesions (default %(default)s)")  # fmt: skip
    s.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads of the parity check")
    s.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<current folder>/mlruns.db)",
    )
    s.add_argument("--name", default="qsmrim", help="registered model name")
    s.set_defaults(func=cmd_export)
    return s
