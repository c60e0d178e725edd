"""Decision thresholds: the paper's per-fold F1 maximum and honest variants that never see the test fold.

Two protocols, never mixed silently:

* **paper** (:func:`paper_fold_thresholds`): for each fold, the threshold that maximises F1 *on that
  fold's own test predictions and labels* (paper section 2.5). This is optimistic: the test labels choose
  the threshold.
* **honest** (:func:`honest_fold_thresholds`, :func:`cross_fold_thresholds`): the threshold of fold ``k``
  is chosen on data that excludes fold ``k`` (an inner split of fold ``k``'s training folds, or the
  out-of-fold predictions of the other folds). These functions are never given test-fold labels.

A lesion is called rim+ when ``score >= threshold``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmrim.evaluation._validation import (
    check_both_classes,
    check_groups,
    check_labels,
    check_same_length,
    check_scores,
    plain,
)
from qsmrim.evaluation.metrics import counts_by_threshold

logger = logging.getLogger(__name__)


def f1_optimal_threshold(y_true: ArrayLike, y_score: ArrayLike) -> tuple[float, float]:
    """The threshold maximising F1 of ``score >= threshold``.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Labels of the lesions the threshold is chosen on, 1 = rim+; both classes must be present.
    y_score : array-like of shape (n_lesions,)
        Their scores.

    Returns
    -------
    threshold : float
        One of the observed scores. Among equally good thresholds the highest is returned (fewest lesions
        called rim+).
    f1 : float
        The F1 reached on these lesions.

    Notes
    -----
    Only observed scores need to be tried: between two consecutive distinct scores the decision does not
    change. With :math:`P` rim+ lesions and :math:`TP_i, FP_i` the counts at the :math:`i`-th highest
    distinct score,

    .. math:: F_1(i) = \\frac{2\\,TP_i}{2\\,TP_i + FP_i + (P - TP_i)} = \\frac{2\\,TP_i}{TP_i + FP_i + P},

    and the threshold is that score at :math:`\\arg\\max_i F_1(i)` (first, i.e. highest, on ties).

    Examples
    --------
    >>> f1_optimal_threshold([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.7])
    (0.6, 0.8)
    """
    yt = check_labels(y_true, "y_true")
    check_both_classes(yt, "y_true")
    thresholds, tp, fp = counts_by_threshold(yt, y_score)
    f1 = 2.0 * tp / (tp + fp + int(yt.sum()))
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def paper_fold_thresholds(y_true: ArrayLike, y_score: ArrayLike, folds: ArrayLike) -> dict[Any, float]:
    """Per-fold F1-maximising thresholds chosen on each fold's own test lesions (the paper's protocol).

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels of the out-of-fold lesions.
    y_score : array-like of shape (n_lesions,)
        Out-of-fold scores.
    folds : array-like of shape (n_lesions,)
        Test-fold id of each lesion.

    Returns
    -------
    dict
        Fold id -> threshold.

    Notes
    -----
    This reproduces paper section 2.5 ("the thresholds for different folds of the cross-validation were
    chosen separately"): the test labels pick the threshold, so the resulting Table 2 metrics are
    optimistic. Report them labelled as the paper's protocol, next to an honest variant.
    """
    yt, ys, fo = _check_triplet(y_true, y_score, folds, "y_true", "y_score", "folds")
    out = {}
    for k in np.unique(fo):
        sel = fo == k
        check_both_classes(yt[sel], "y_true", f" in fold {plain(k)!r}")
        out[plain(k)] = f1_optimal_threshold(yt[sel], ys[sel])[0]
    return out


def honest_fold_thresholds(
    selection_true: ArrayLike, selection_score: ArrayLike, selection_folds: ArrayLike
) -> dict[Any, float]:
    """Per-fold F1-maximising thresholds chosen on separate threshold-selection predictions.

    Parameters
    ----------
    selection_true : array-like of shape (n_selection,)
        Labels of the threshold-selection lesions, e.g. an inner validation split of fold ``k``'s training
        folds. They must not include any lesion (or subject) of test fold ``k``.
    selection_score : array-like of shape (n_selection,)
        The scores fold ``k``'s model gave those lesions.
    selection_folds : array-like of shape (n_selection,)
        For each selection lesion, the test fold whose threshold it helps choose.

    Returns
    -------
    dict
        Fold id -> threshold.

    Notes
    -----
    The test fold's labels are not an argument, so they cannot influence the threshold. Apply the result to
    the test scores with :func:`apply_fold_thresholds`. ``evaluate_predictions`` additionally checks that
    no selection subject belongs to the test fold it selects for.
    """
    yt, ys, fo = _check_triplet(
        selection_true, selection_score, selection_folds, "selection_true", "selection_score", "selection_folds"
    )
    out = {}
    for k in np.unique(fo):
        sel = fo == k
        check_both_classes(yt[sel], "selection_true", f" for fold {plain(k)!r}")
        out[plain(k)] = f1_optimal_threshold(yt[sel], ys[sel])[0]
    return out


def cross_fold_thresholds(y_true: ArrayLike, y_score: ArrayLike, folds: ArrayLike) -> dict[Any, float]:
    """Honest per-fold thresholds from the pooled out-of-fold predictions of the *other* folds.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels of the out-of-fold lesions.
    y_score : array-like of shape (n_lesions,)
        Out-of-fold scores.
    folds : array-like of shape (n_lesions,)
        Test-fold id of each lesion; at least 2 folds.

    Returns
    -------
    dict
        Fold id -> threshold, each chosen with :func:`f1_optimal_threshold` on the lesions of all other
        folds.

    Notes
    -----
    Fold ``k``'s threshold never uses fold ``k``'s labels. It is a fallback for runs without an inner
    split: the other folds' scores come from other models, so a threshold transfers well only when the
    fold models are similarly calibrated.
    """
    yt, ys, fo = _check_triplet(y_true, y_score, folds, "y_true", "y_score", "folds")
    ks = np.unique(fo)
    if ks.size < 2:
        raise ValueError(f"folds must hold at least 2 folds for cross-fold thresholds, got {ks.tolist()}")
    out = {}
    for k in ks:
        rest = fo != k
        check_both_classes(yt[rest], "y_true", f" outside fold {plain(k)!r}")
        out[plain(k)] = f1_optimal_threshold(yt[rest], ys[rest])[0]
    return out


def apply_fold_thresholds(
    y_score: ArrayLike, folds: ArrayLike, thresholds: dict[Any, float]
) -> NDArray[np.int64]:
    """Binary predictions ``score >= thresholds[fold]``.

    Parameters
    ----------
    y_score : array-like of shape (n_lesions,)
        Scores.
    folds : array-like of shape (n_lesions,)
        Fold id of each lesion; every id must be a key of ``thresholds``.
    thresholds : dict
        Fold id -> threshold.

    Returns
    -------
    ndarray of shape (n_lesions,)
        1 = rim+.
    """
    ys = check_scores(y_score, "y_score")
    fo = check_groups(folds, "folds")
    check_same_length([ys, fo], ["y_score", "folds"])
    keys = {plain(k) for k in np.unique(fo)}
    missing = sorted(keys - set(thresholds), key=str)
    if missing:
        raise ValueError(f"thresholds has no entry for folds {missing}; it has {sorted(thresholds, key=str)}")
    t = np.array([thresholds[plain(k)] for k in fo], dtype=np.float64)
    return (ys >= t).astype(np.int64)


def _check_triplet(
    y_true: ArrayLike, y_score: ArrayLike, folds: ArrayLike, n_true: str, n_score: str, n_folds: str
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[Any]]:
    yt = check_labels(y_true, n_true)
    ys = check_scores(y_score, n_score)
    fo = check_groups(folds, n_folds)
    check_same_length([yt, ys, fo], [n_true, n_score, n_folds])
    return yt, ys, fo

