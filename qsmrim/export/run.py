"""Export a trained run: the library function behind ``qsmrim export`` (:func:`export_run`) and what it reads
from the run (evaluation, screening threshold, CV metrics, out-of-fold inputs).

:mod:`qsmrim.export.cli` only parses the command line and calls :func:`export_run` with the same parameter
names; :func:`qsmrim.pipeline.run_pipeline`, jobs and the demo call it directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qsmrim.export.precision import PrecisionConfig
from qsmrim.models.base import N_RADIOMICS
from qsmrim.onnx_runtime import DEFAULT_MAX_RIM_FLIP_SHARE, PRECISIONS
from qsmrim.training.layout import RunLayout

__all__ = ["cv_metrics_of_run", "evaluation_of_run", "export_run", "oof_inputs", "screening_of_run"]

log = logging.getLogger(__name__)


def evaluation_of_run(run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """A run's evaluation results by label and the file they came from (evaluated first if missing)."""
    run_dir = Path(run_dir)
    path = RunLayout(run_dir).evaluation_json
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

    config_path = RunLayout(run).config
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
