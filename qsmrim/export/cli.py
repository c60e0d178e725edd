"""``qsmrim export RUN --out model.onnx [--precision fp32|fp16|int8] [--register] [--force] [--model NAME] ...``.

Kept out of ``qsmrim/cli.py`` so the export glue lives with the exporter; the main CLI mounts it with
``add_export_parser(sub)``. :func:`export_run` is the importable function behind the command (same
parameter names), so jobs and the demo pipeline call it without argparse.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qsmrim.export.precision import INT8_FORMATS, INT8_METHODS, PrecisionConfig
from qsmrim.models.base import N_RADIOMICS
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

log = logging.getLogger(__name__)


def evaluation_of_run(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """A run's evaluation results by label and the file they came from (evaluated first if missing)."""
    run_dir = Path(run_dir)
    path = run_dir / "evaluation" / "evaluation.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8")), path
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); rerun `qsmrim evaluate {run_dir}`") from exc
    from qsmrim.training.evaluate_run import evaluate_run

    log.info("%s missing: evaluating the run first", path)
    return evaluate_run(run_dir, with_figures=False), path


def _label(model: str, protocol: str) -> str:
    return model if protocol == "paper" else f"{model} [honest]"


def screening_of_run(run_dir: str | Path, model: str, protocol: str = "paper") -> dict[str, Any] | None:
    """CV's high-sensitivity point of ``model`` for the sidecar's ``screening`` entry, or None (warned)."""
    from qsmrim.export.sidecar import screening_from_evaluation

    results, path = evaluation_of_run(run_dir)
    label = _label(model, protocol)
    screening = screening_from_evaluation(results[label], str(path)) if label in results else None
    if screening is None:
        log.warning("%s: no high-sensitivity threshold for %r; the model is exported without one and serving "
                    "flags review by the rim call", path, label)  # fmt: skip
    return screening


def cv_metrics_of_run(run_dir: str | Path, model: str, protocol: str = "paper") -> dict[str, float | None]:
    """CV metrics of a run's fold ensemble from ``<run>/evaluation/evaluation.json`` (evaluated if missing).

    The label is ``<model>`` for the paper protocol and ``<model> [honest]`` for the honest one, as
    :func:`qsmrim.training.evaluate_run.evaluate_run` writes them.
    """
    results, path = evaluation_of_run(run_dir)
    label = _label(model, protocol)
    if label not in results:
        raise ValueError(
            f"{path}: no results for {label!r} (has {sorted(results)}); rerun `qsmrim evaluate {run_dir}`"
        )
    res = results[label]
    try:
        out: dict[str, float | None] = {"cv_pr_auc": res["pr"]["auc"], "cv_proc_auc": res["proc"]["auc"]}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: results[{label!r}] lacks pr.auc / proc.auc ({exc})") from exc
    for key in ("f1", "sensitivity", "specificity", "ppv", "accuracy"):
        value = (res.get("lesion") or {}).get(key)
        if isinstance(value, int | float):
            out[f"cv_{key}"] = float(value)
    return out


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    register: bool = False,
    force: bool = False,
    model: str | None = None,
    protocol: str = "paper",
    fp16: bool = False,
    external_data: bool | None = None,
    tracking_uri: str | None = None,
    name: str = "qsmrim",
    precision: str = "fp32",
    precision_config: PrecisionConfig | None = None,
    max_rim_flip_share: float = DEFAULT_MAX_RIM_FLIP_SHARE,
    threads: int = 0,
) -> dict[str, Any]:
    """Export ``run``'s ensemble to ``out`` and, with ``register``, log/register it and maybe promote it.

    With ``precision`` fp16 or int8 the fp32 graph is still written to ``out`` (the reference), the converted
    graph beside it as ``<stem>.<precision>.onnx``, with its parity against fp32 on the run's out-of-fold
    lesions in its sidecar; ``register`` then registers the converted graph, and refuses it when its rim calls
    flip on more than ``max_rim_flip_share`` of those lesions.
    """
    from qsmrim.export.ensemble import load_members
    from qsmrim.export.graph import export_ensemble
    from qsmrim.export.sidecar import read_sidecar, sidecar_path_for

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
    run = Path(run)
    members = load_members(run, model)
    screening = screening_of_run(run, members[0].model_name, protocol)
    path = export_ensemble(
        members, out, protocol=protocol, fp16=fp16, external_data=external_data, screening=screening
    )
    if precision != "fp32":
        from qsmrim.export.precision import export_precision

        patch, radiomics, keys = oof_inputs(run, members)
        path = export_precision(members, path, precision, patch=patch, radiomics=radiomics, keys=keys,
                                config=precision_config or PrecisionConfig(), threads=threads)  # fmt: skip
    sidecar = read_sidecar(sidecar_path_for(path))
    result: dict[str, Any] = {
        "onnx": str(path),
        "sidecar": str(sidecar_path_for(path)),
        "sidecar_content": sidecar,
    }
    if not register:
        return result
    from qsmrim.tracking.mlflow_runs import artifact_root, git_commit, resolve_tracking_uri
    from qsmrim.tracking.registry import log_and_register

    config_path = run / "config.resolved.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    uri = resolve_tracking_uri(tracking_uri)
    artifacts = artifact_root(uri).as_uri() if artifact_root(uri) is not None else None
    result["registry"] = log_and_register(
        path, sidecar_path_for(path), cv_metrics=cv_metrics_of_run(run, members[0].model_name, protocol),
        config=config, git_commit=git_commit(), name=name, force=force, tracking_uri=uri,
        artifact_location=artifacts, max_rim_flip_share=max_rim_flip_share,
    )  # fmt: skip
    result["tracking_uri"] = uri
    return result


def oof_inputs(
    run: str | Path, members: list[Any]
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Raw inputs of the run's out-of-fold lesions (every lesion some member was tested on) and their keys.

    Read from the run's cached patches (``prepared/``) and radiomics (``features/``); image-only models get
    zero radiomics (their graph ignores the input). Rows keep the order of the run's lesion table.
    """
    from qsmrim.experiment import load_run_data
    from qsmrim.models import uses_radiomics

    run = Path(run)
    with_features = uses_radiomics(members[0].model_name)
    try:
        data = load_run_data(run, with_features=with_features)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{run}: checking a reduced-precision graph needs the run's cached lesions "
                                f"(prepared/, and features/ for radiomics models): {exc}") from exc  # fmt: skip
    tested: set[tuple[str, int]] = set()
    for m in members:
        if m.predictions is not None:
            tested.update(
                zip(m.predictions["subject"].astype(str), m.predictions["lesion"].astype(int), strict=True)
            )
    keys = zip(data.subjects.astype(str), data.lesions.astype(int), strict=True)
    rows = np.array(
        [i for i, k in enumerate(keys) if k in tested] if tested else np.flatnonzero(data.labels >= 0)
    )
    if not len(rows):
        raise ValueError(f"{run}: no out-of-fold lesions to check a reduced-precision graph on")
    patch = np.ascontiguousarray(data.patches[rows], dtype=np.float32)
    if data.radiomics is not None:
        radiomics = np.asarray(data.radiomics[rows], dtype=np.float32)
    else:
        radiomics = np.zeros((len(rows), len(members[0].feature_names) or N_RADIOMICS), np.float32)
    return patch, radiomics, (data.subjects[rows], data.lesions[rows])


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
