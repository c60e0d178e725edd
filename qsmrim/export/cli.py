"""``qsmrim export RUN --out model.onnx [--register] [--force] [--model NAME] [--protocol paper|honest]``.

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

__all__ = [
    "add_export_parser",
    "cmd_export",
    "cv_metrics_of_run",
    "evaluation_of_run",
    "export_run",
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
) -> dict[str, Any]:
    """Export ``run``'s ensemble to ``out`` and, with ``register``, log/register it and maybe promote it."""
    from qsmrim.export.ensemble import load_members
    from qsmrim.export.graph import export_ensemble
    from qsmrim.export.sidecar import read_sidecar, sidecar_path_for

    run = Path(run)
    members = load_members(run, model)
    screening = screening_of_run(run, members[0].model_name, protocol)
    path = export_ensemble(
        members, out, protocol=protocol, fp16=fp16, external_data=external_data, screening=screening
    )
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
        artifact_location=artifacts,
    )  # fmt: skip
    result["tracking_uri"] = uri
    return result


def cmd_export(args: argparse.Namespace) -> int:
    res = export_run(args.run, args.out, register=args.register, force=args.force, model=args.model,
                     protocol=args.protocol, fp16=args.fp16, external_data=True if args.external_data else None,
                     tracking_uri=args.tracking_uri, name=args.name)  # fmt: skip
    side = res["sidecar_content"]
    files = side["onnx"]["files"]
    size = sum(f["bytes"] for f in files.values())
    print(f"wrote {res['onnx']} ({side['n_members']} {side['model']} member(s), {size / 1e6:.1f} MB"
          f"{', weights in ' + files['external_data']['name'] if 'external_data' in files else ''}) and {res['sidecar']}")  # fmt: skip
    parity = side.get("parity") or {}
    if parity:
        print(f"  parity with torch: max |prob diff| {parity['max_prob_diff']:.2g} (atol {parity['atol']:g})")
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
        "--fp16", action="store_true", help="store weights as float16 (half the size, parity ~1e-3)"
    )
    s.add_argument("--external-data", action="store_true", help="weights in <out>.data even below 2 GB")
    s.add_argument(
        "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<current folder>/mlruns.db)"
    )
    s.add_argument("--name", default="qsmrim", help="registered model name")
    s.set_defaults(func=cmd_export)
    return s
