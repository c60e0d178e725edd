"""Evaluation of out-of-fold rim+ predictions as in the paper (section 2.5; DESIGN section 7).

Plain functions on NumPy arrays and pandas DataFrames; no Ray, Dask, MLflow or torch. Start with
:func:`evaluate_predictions` (one method's out-of-fold predictions -> JSON-ready dict) and
:func:`write_report` (several such dicts -> ``report.md``, ``report.html``, PNGs).
"""

from qsmrim.evaluation.calibration import (
    BIN_STRATEGIES,
    brier_score,
    calibration_summary,
    reliability_curve,
)
from qsmrim.evaluation.curves import (
    AveragedCurve,
    averaged_pr,
    averaged_roc,
    mcclish,
    pr_points,
    pr_step,
    roc_points,
    roc_step,
)
from qsmrim.evaluation.evaluate import (
    PROTOCOLS,
    REQUIRED_COLUMNS,
    check_predictions,
    evaluate_predictions,
    json_ready,
)
from qsmrim.evaluation.metrics import (
    METRIC_NAMES,
    classification_metrics,
    confusion_counts,
    counts_by_threshold,
    metrics_from_counts,
)
from qsmrim.evaluation.names import DISPLAY_NAMES
from qsmrim.evaluation.operating_point import high_sensitivity_point
from qsmrim.evaluation.report import (
    ABLATION_VARIANTS,
    render_html,
    render_markdown,
    write_report,
)
from qsmrim.evaluation.subject import count_agreement, pearson_ci, subject_counts
from qsmrim.evaluation.thresholds import (
    apply_fold_thresholds,
    cross_fold_thresholds,
    f1_optimal_threshold,
    honest_fold_thresholds,
    paper_fold_thresholds,
)
from qsmrim.evaluation.uncertainty import rank_auroc, spread_flags_errors

__all__ = [
    "ABLATION_VARIANTS",
    "BIN_STRATEGIES",
    "DISPLAY_NAMES",
    "METRIC_NAMES",
    "PROTOCOLS",
    "REQUIRED_COLUMNS",
    "AveragedCurve",
    "apply_fold_thresholds",
    "averaged_pr",
    "averaged_roc",
    "brier_score",
    "calibration_summary",
    "check_predictions",
    "classification_metrics",
    "confusion_counts",
    "count_agreement",
    "counts_by_threshold",
    "cross_fold_thresholds",
    "evaluate_predictions",
    "f1_optimal_threshold",
    "high_sensitivity_point",
    "honest_fold_thresholds",
    "json_ready",
    "mcclish",
    "metrics_from_counts",
    "paper_fold_thresholds",
    "pearson_ci",
    "pr_points",
    "pr_step",
    "rank_auroc",
    "reliability_curve",
    "render_html",
    "render_markdown",
    "roc_points",
    "roc_step",
    "spread_flags_errors",
    "subject_counts",
    "write_report",
]
