"""Confusion-matrix metrics of the paper's Table 2 (accuracy, F1, sensitivity, specificity, PPV).

Rim+ (label 1) is the positive class throughout. Counts are plain ints, metrics plain floats, so the
results go straight into JSON.
"""

from __future__ import annotations

import logging
import math
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmrim.evaluation._validation import check_labels, check_same_length, check_scores

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "sensitivity", "specificity", "ppv")
"""Table 2 metric names, in the paper's column order."""


class ConfusionCounts(TypedDict):
    """Lesion counts of a binary rim+/rim- decision."""

    tp: int
    fp: int
    fn: int
    tn: int


def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike) -> ConfusionCounts:
    """Count true/false positives and negatives of binary rim+ predictions.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, 0 = rim-.
    y_pred : array-like of shape (n_lesions,)
        Predicted labels, 1 = rim+, 0 = rim-.

    Returns
    -------
    counts : dict
        ``{"tp", "fp", "fn", "tn"}`` as ints.

    Examples
    --------
    >>> confusion_counts([1, 1, 0, 0], [1, 0, 1, 0])
    {'tp': 1, 'fp': 1, 'fn': 1, 'tn': 1}
    """
    yt = check_labels(y_true, "y_true")
    yp = check_labels(y_pred, "y_pred")
    check_same_length([yt, yp], ["y_true", "y_pred"])
    tp = int(np.sum((yt == 1) & (yp == 1)))
    fp = int(np.sum((yt == 0) & (yp == 1)))
    fn = int(np.sum((yt == 1) & (yp == 0)))
    tn = int(np.sum((yt == 0) & (yp == 0)))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Accuracy, F1, sensitivity, specificity and PPV from confusion counts.

    Parameters
    ----------
    tp, fp, fn, tn : int
        Non-negative lesion counts.

    Returns
    -------
    metrics : dict
        ``{"accuracy", "f1", "sensitivity", "specificity", "ppv"}`` as floats. A ratio whose denominator is
        0 (for example PPV when nothing is predicted rim+) is ``nan``, never a silent 0.

    Notes
    -----
    With :math:`N = TP + FP + FN + TN`:

    .. math::

        \\mathrm{accuracy} = \\frac{TP + TN}{N}, \\quad
        \\mathrm{sensitivity} = \\frac{TP}{TP + FN}, \\quad
        \\mathrm{specificity} = \\frac{TN}{TN + FP}, \\quad
        \\mathrm{PPV} = \\frac{TP}{TP + FP},

    .. math::

        F_1 = 2\\,\\frac{\\mathrm{PPV}\\cdot\\mathrm{sensitivity}}{\\mathrm{PPV} + \\mathrm{sensitivity}}
            = \\frac{2\\,TP}{2\\,TP + FP + FN}.

    The second form of :math:`F_1` is used; it is defined whenever there is any positive lesion or
    prediction (it is 0, not undefined, when TP = 0 but FP + FN > 0).

    Examples
    --------
    >>> m = metrics_from_counts(120, 44, 57, 3942)  # QSMRim-Net, paper Table 2
    >>> round(m["specificity"], 3), round(m["ppv"], 3)
    (0.989, 0.732)
    """
    counts = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    n = tp + fp + fn + tn
    if n == 0:
        raise ValueError("tp, fp, fn, tn are all 0; at least one lesion is needed")
    return {
        "accuracy": (tp + tn) / n,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
    }


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float | int]:
    """Confusion counts and the Table 2 metrics of binary predictions.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+.
    y_pred : array-like of shape (n_lesions,)
        Predicted labels, 1 = rim+.

    Returns
    -------
    result : dict
        ``tp, fp, fn, tn`` (ints) and ``accuracy, f1, sensitivity, specificity, ppv`` (floats).

    See Also
    --------
    metrics_from_counts : the formulas.
    """
    counts = confusion_counts(y_true, y_pred)
    return {**counts, **metrics_from_counts(**counts)}


def counts_by_threshold(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Cumulative TP and FP counts for every distinct score used as a threshold.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+.
    y_score : array-like of shape (n_lesions,)
        Scores, higher = more likely rim+ (probabilities or logits).

    Returns
    -------
    thresholds : ndarray of shape (n_distinct,)
        The distinct scores in decreasing order.
    tp, fp : ndarray of shape (n_distinct,)
        ``tp[i]`` and ``fp[i]`` count the lesions with ``y_score >= thresholds[i]``.

    Notes
    -----
    Tied scores form one threshold, so a decision ``score >= t`` can never split a tie. This is the
    sort-and-cumulate construction of every ROC/PR routine; thresholds below the lowest score add nothing
    (all lesions are already called rim+), and the empty decision (nothing called rim+, TP = FP = 0) is not
    listed.
    """
    yt = check_labels(y_true, "y_true")
    ys = check_scores(y_score, "y_score")
    check_same_length([yt, ys], ["y_true", "y_score"])
    order = np.argsort(-ys, kind="mergesort")
    ys, yt = ys[order], yt[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ys)), ys.size - 1]
    tp = np.cumsum(yt)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return ys[last_of_tie], tp.astype(np.int64), fp.astype(np.int64)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan
