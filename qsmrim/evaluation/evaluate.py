"""Everything the report needs about one method, from its out-of-fold predictions.

Input format (one DataFrame per method, one row per lesion, every lesion once):

==========  ========  ==========================================================================
column      required  meaning
==========  ========  ==========================================================================
subject     yes       subject id (str or int); all lesions of a subject lie in one fold
lesion      yes       lesion id, unique within its subject
fold        yes       the cross-validation fold in which the lesion was a test lesion
rim         yes       expert label, 1 = rim+, 0 = rim-
prob        yes       out-of-fold score of the fold ensemble (mean member probability)
threshold   no        per-lesion decision threshold chosen without the test fold (``honest``)
rim_pred    no        a ready decision, 0/1, e.g. the 2-of-3 member vote (``given``)
votes       no        number of members voting rim+ (``given`` uses ``votes >= min_votes``
                      when ``rim_pred`` is absent)
spread      no        population std of the member probabilities; adds the ``uncertainty`` result
==========  ========  ==========================================================================

The threshold-selection table for ``protocol="honest"`` has columns ``fold, rim, prob`` and optionally
``subject``: the predictions fold ``k``'s model made on lesions outside test fold ``k`` (an inner split of
its training folds), tagged with ``fold = k``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from qsmrim.evaluation._validation import check_labels, check_scores, plain
from qsmrim.evaluation.calibration import calibration_summary
from qsmrim.evaluation.curves import averaged_pr, averaged_roc
from qsmrim.evaluation.metrics import classification_metrics
from qsmrim.evaluation.operating_point import high_sensitivity_point
from qsmrim.evaluation.subject import count_agreement, subject_counts
from qsmrim.evaluation.thresholds import (
    apply_fold_thresholds,
    cross_fold_thresholds,
    honest_fold_thresholds,
    paper_fold_thresholds,
)
from qsmrim.evaluation.uncertainty import spread_flags_errors

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("subject", "lesion", "fold", "rim", "prob")
"""Columns every predictions DataFrame must have."""

PROTOCOLS: Mapping[str, str] = {
    "paper": "per-fold threshold maximising F1 on the test fold itself (paper 2.5; optimistic)",
    "honest": "per-fold threshold chosen without the test fold (inner split of the training folds)",
    "cross-fold": "per-fold threshold maximising F1 on the other folds' out-of-fold predictions",
    "given": "decisions supplied with the predictions (rim_pred, or votes >= min_votes)",
}
"""How binary rim+ decisions are made; the key is recorded with every result."""


def evaluate_predictions(
    predictions: pd.DataFrame,
    *,
    protocol: str = "paper",
    selection: pd.DataFrame | None = None,
    method: str | None = None,
    max_fpr: float = 0.1,
    max_sensitivity: float = 0.95,
    include_missed: bool = False,
    confidence: float = 0.95,
    min_votes: int = 2,
    n_bins: int = 10,
    bin_strategy: str = "uniform",
) -> dict[str, Any]:
    """Lesion, curve, subject and operating-point results of one method's out-of-fold predictions.

    Parameters
    ----------
    predictions : DataFrame
        One row per lesion, columns as in the module docstring.
    protocol : {"paper", "honest", "cross-fold", "given"}, default="paper"
        How the binary decisions behind the Table 2 metrics and subject counts are made (:data:`PROTOCOLS`).
        ``"honest"`` needs ``selection`` or a ``threshold`` column; ``"given"`` needs ``rim_pred`` or
        ``votes``.
    selection : DataFrame, default=None
        Threshold-selection predictions for ``protocol="honest"`` (see the module docstring). When it has a
        ``subject`` column, a subject that is also in test fold ``k`` must not select fold ``k``'s threshold.
    method : str, default=None
        Name recorded in the result (the model registry name, e.g. ``"qsmrimnet"``).
    max_fpr : float, default=0.1
        Upper FPR of the partial ROC curve.
    max_sensitivity : float, default=0.95
        The high-sensitivity operating point stays strictly below this sensitivity.
    include_missed : bool, default=False
        Count missed rim+ lesions as reviewed at the high-sensitivity point (the paper's convention; see
        :func:`~qsmrim.evaluation.operating_point.high_sensitivity_point`).
    confidence : float, default=0.95
        Level of the Pearson r interval.
    min_votes : int, default=2
        ``protocol="given"`` without ``rim_pred``: rim+ when ``votes >= min_votes``.
    n_bins : int, default=10
        Bins of the reliability curve.
    bin_strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width reliability bins on [0, 1] (the same for every method, so a report can line them up)
        or equal-count bins (see :func:`~qsmrim.evaluation.calibration.reliability_curve`).

    Returns
    -------
    dict
        JSON-serialisable (``json.dumps(result, allow_nan=False)`` works; undefined values are ``None``)::

            method, protocol, protocol_note, n_lesions, n_rim, n_subjects, folds
            thresholds        [{"fold", "threshold"}] or None (protocol "given")
            lesion            tp, fp, fn, tn, accuracy, f1, sensitivity, specificity, ppv
                              (Table 2, on the concatenated folds)
            lesion_per_fold   [{"fold", tp, fp, fn, tn, accuracy, ...}]
            proc              averaged partial ROC: x (FPR grid), y (mean TPR), x_max, area,
                              auc (= area / max_fpr), mcclish, folds, fold_auc
            pr                averaged PR: x (recall grid), y (mean precision), auc, fold_auc, ...,
                              prevalence
            subject           r, ci_low, ci_high, confidence, mse, n_subjects,
                              counts {"subject": [...], "expert": [...], "predicted": [...]}
            high_sensitivity  threshold (None = flag nothing), sensitivity, specificity, ppv, tp, fp,
                              fn, tn, n_lesions, lesions_to_review, review_saved, include_missed
            calibration       brier, brier_reference, brier_skill, ece,
                              reliability {strategy, n_bins, edges, count, mean_prob, fraction_rim};
                              None when ``prob`` is a score outside [0, 1]
            uncertainty       only with a ``spread`` column: auroc (of spread for lesions the
                              protocol's decisions get wrong), n_errors, n_lesions,
                              mean_spread_errors, mean_spread_correct

    Notes
    -----
    The curves, the calibration and the high-sensitivity point depend on ``prob`` only; the protocol
    changes the binary decisions (``lesion``, ``lesion_per_fold``, ``subject``, and the errors behind
    ``uncertainty``). The high-sensitivity point uses one threshold
    on the pooled out-of-fold scores. The paper thresholds each of 3 members and takes a majority vote;
    ``protocol="paper"`` here thresholds the ensemble probability instead. Pass the members' vote as
    ``rim_pred`` with ``protocol="given"`` to evaluate the vote itself.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    df = check_predictions(predictions, "predictions")
    y = df["rim"].to_numpy()
    prob = df["prob"].to_numpy()
    folds = df["fold"].to_numpy()

    thresholds = _thresholds(df, protocol, selection)
    if thresholds is None:
        y_pred = _given_decisions(df, min_votes)
    else:
        y_pred = apply_fold_thresholds(prob, folds, thresholds)

    roc = averaged_roc(y, prob, folds, max_fpr=max_fpr)
    pr = averaged_pr(y, prob, folds)
    per_fold = []
    for k in np.unique(folds):
        sel = folds == k
        per_fold.append({"fold": plain(k), **classification_metrics(y[sel], y_pred[sel])})
    counts = subject_counts(df["subject"].to_numpy(), y, y_pred)
    agreement = count_agreement(df["subject"].to_numpy(), y, y_pred, confidence=confidence)
    result = {
        "method": method,
        "protocol": protocol,
        "protocol_note": PROTOCOLS[protocol],
        "n_lesions": int(len(df)),
        "n_rim": int(y.sum()),
        "n_subjects": int(df["subject"].nunique()),
        "folds": [plain(k) for k in np.unique(folds)],
        "thresholds": None
        if thresholds is None
        else [{"fold": plain(k), "threshold": float(thresholds[plain(k)])} for k in np.unique(folds)],
        "lesion": classification_metrics(y, y_pred),
        "lesion_per_fold": per_fold,
        "proc": roc.to_dict(),
        "pr": {**pr.to_dict(), "prevalence": float(y.mean())},
        "subject": {
            **agreement,
            "counts": {
                "subject": [plain(s) for s in counts["subject"]],
                "expert": [int(v) for v in counts["expert"]],
                "predicted": [int(v) for v in counts["predicted"]],
            },
        },
        "high_sensitivity": high_sensitivity_point(
            y, prob, max_sensitivity=max_sensitivity, include_missed=include_missed
        ),
        "calibration": calibration_summary(y, prob, n_bins=n_bins, strategy=bin_strategy)
        if ((prob >= 0) & (prob <= 1)).all()
        else None,
    }
    if "spread" in df.columns:
        result["uncertainty"] = spread_flags_errors(y, y_pred, df["spread"].to_numpy())
    logger.info(
        "%s (%s): pROC AUC %.3f, PR AUC %.3f, F1 %.3f",
        method or "predictions",
        protocol,
        roc.auc,
        pr.auc,
        result["lesion"]["f1"],
    )
    return json_ready(result)


def check_predictions(predictions: pd.DataFrame, name: str = "predictions") -> pd.DataFrame:
    """Validate an out-of-fold predictions DataFrame and return it with a fresh index.

    Raises ``ValueError`` naming ``name`` and the column when a required column is missing, the frame is
    empty, ``rim`` is not 0/1, ``prob`` is not finite, a ``(subject, lesion)`` pair repeats, or a subject
    lies in more than one fold.
    """
    if not isinstance(predictions, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(predictions).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; required are {list(REQUIRED_COLUMNS)}")
    if predictions.empty:
        raise ValueError(f"{name} is empty; at least one lesion is needed")
    df = predictions.reset_index(drop=True)
    for col in ("subject", "lesion", "fold"):
        if df[col].isna().any():
            raise ValueError(f"{name}['{col}'] has {int(df[col].isna().sum())} missing values")
    check_labels(df["rim"].to_numpy(), f"{name}['rim']")
    check_scores(df["prob"].to_numpy(), f"{name}['prob']")
    dup = df.duplicated(["subject", "lesion"])
    if dup.any():
        first = df.loc[dup, ["subject", "lesion"]].iloc[0].tolist()
        raise ValueError(f"{name} repeats (subject, lesion) pairs, e.g. {first}; each lesion must appear once")
    n_folds = df.groupby("subject")["fold"].nunique()
    if (n_folds > 1).any():
        bad = n_folds[n_folds > 1].index[:5].tolist()
        raise ValueError(f"{name}: subjects {bad} lie in more than one fold; splits must be subject-level")
    return df


def json_ready(obj: Any) -> Any:
    """Recursively turn NumPy scalars into Python ones and NaN/inf floats into ``None``."""
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str | int) else k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [json_ready(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _thresholds(df: pd.DataFrame, protocol: str, selection: pd.DataFrame | None) -> dict[Any, float] | None:
    y, prob, folds = df["rim"].to_numpy(), df["prob"].to_numpy(), df["fold"].to_numpy()
    if protocol != "honest" and selection is not None:
        raise ValueError(f"selection is only used with protocol='honest', got protocol={protocol!r}")
    if protocol == "paper":
        return paper_fold_thresholds(y, prob, folds)
    if protocol == "cross-fold":
        return cross_fold_thresholds(y, prob, folds)
    if protocol == "given":
        return None
    # honest
    if selection is not None and "threshold" in df.columns:
        raise ValueError("protocol='honest' got both selection and a 'threshold' column; pass only one")
    if selection is not None:
        return _honest_from_selection(df, selection)
    if "threshold" in df.columns:
        return _thresholds_from_column(df)
    raise ValueError(
        "protocol='honest' needs selection (inner-split predictions with fold, rim, prob) or a 'threshold' "
        "column in predictions; use protocol='cross-fold' for thresholds from the other folds"
    )


def _honest_from_selection(df: pd.DataFrame, selection: pd.DataFrame) -> dict[Any, float]:
    if not isinstance(selection, pd.DataFrame):
        raise ValueError(f"selection must be a pandas DataFrame, got {type(selection).__name__}")
    missing = [c for c in ("fold", "rim", "prob") if c not in selection.columns]
    if missing:
        raise ValueError(f"selection lacks columns {missing}; required are ['fold', 'rim', 'prob']")
    if selection.empty:
        raise ValueError("selection is empty; at least one lesion per fold is needed")
    if "subject" in selection.columns:
        test_fold = df.groupby("subject")["fold"].first()
        sel_test_fold = selection["subject"].map(test_fold)
        leak = sel_test_fold.notna() & (sel_test_fold == selection["fold"])
        if leak.any():
            s = selection.loc[leak, ["subject", "fold"]].iloc[0].tolist()
            raise ValueError(
                f"selection leaks the test fold: subject {s[0]!r} selects the threshold of fold {s[1]!r}, "
                "its own test fold"
            )
    thresholds = honest_fold_thresholds(
        selection["rim"].to_numpy(), selection["prob"].to_numpy(), selection["fold"].to_numpy()
    )
    missing_folds = sorted({plain(k) for k in df["fold"].unique()} - set(thresholds), key=str)
    if missing_folds:
        raise ValueError(f"selection has no rows for folds {missing_folds}")
    return thresholds


def _thresholds_from_column(df: pd.DataFrame) -> dict[Any, float]:
    t = check_scores(df["threshold"].to_numpy(), "predictions['threshold']")
    per_fold = pd.Series(t).groupby(df["fold"].to_numpy()).nunique()
    if (per_fold > 1).any():
        raise ValueError(
            f"predictions['threshold'] must be constant within a fold, folds {per_fold[per_fold > 1].index.tolist()} vary"
        )
    return {plain(k): float(v) for k, v in pd.Series(t).groupby(df["fold"].to_numpy()).first().items()}


def _given_decisions(df: pd.DataFrame, min_votes: int) -> np.ndarray:
    if "rim_pred" in df.columns:
        return check_labels(df["rim_pred"].to_numpy(), "predictions['rim_pred']")
    if "votes" in df.columns:
        if isinstance(min_votes, bool) or not isinstance(min_votes, int) or min_votes < 1:
            raise ValueError(f"min_votes must be a positive int, got {min_votes!r}")
        votes = check_scores(df["votes"].to_numpy(), "predictions['votes']")
        if (votes < 0).any() or (votes != np.round(votes)).any():
            raise ValueError("predictions['votes'] must hold non-negative integers")
        return (votes >= min_votes).astype(np.int64)
    raise ValueError("protocol='given' needs a 'rim_pred' or 'votes' column in predictions")

