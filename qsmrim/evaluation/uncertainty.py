"""Does the ensemble's spread flag its own errors? AUROC of the member spread for misclassified lesions.

``spread`` is the population standard deviation of the ensemble members' probabilities (DESIGN section 5);
the review page shows it as the model's uncertainty. It earns that place only if lesions the ensemble gets
wrong tend to have a larger spread than those it gets right, i.e. if the AUROC below is clearly above 0.5.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from qsmrim.evaluation._validation import check_labels, check_same_length, check_scores

logger = logging.getLogger(__name__)


def rank_auroc(y_true: ArrayLike, score: ArrayLike) -> float | None:
    """Area under the ROC curve of ``score`` for ``y_true == 1``, with ties counted as half.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary target, 1 = the event the score should flag.
    score : array-like of shape (n,)
        Finite scores; larger means more likely an event.

    Returns
    -------
    float or None
        ``None`` when ``y_true`` holds only one class (the AUROC is undefined).

    Notes
    -----
    The Mann-Whitney form with mid-ranks :math:`R_i` of the scores:
    :math:`\\mathrm{AUROC} = \\frac{\\sum_{i: y_i = 1} R_i - n_1 (n_1 + 1) / 2}{n_1 n_0}`, which equals the
    probability that a random event scores above a random non-event, plus half the probability of a tie.

    Examples
    --------
    >>> rank_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y = check_labels(y_true, "y_true")
    s = check_scores(score, "score")
    check_same_length([y, s], ["y_true", "score"])
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = midrank[inverse]
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def spread_flags_errors(y_true: ArrayLike, y_pred: ArrayLike, spread: ArrayLike) -> dict[str, Any]:
    """How well the member spread separates misclassified from correctly classified lesions.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, 0 = rim-.
    y_pred : array-like of shape (n_lesions,)
        The decisions at an operating point (e.g. the paper protocol's 2-of-3 vote), 1 = rim+.
    spread : array-like of shape (n_lesions,)
        Population standard deviation of the member probabilities, >= 0.

    Returns
    -------
    dict
        ``auroc`` (of spread for ``y_pred != y_true``; ``None`` with no errors or only errors), ``n_errors``,
        ``n_lesions``, ``mean_spread_errors`` and ``mean_spread_correct`` (``None`` for an empty group).
    """
    y = check_labels(y_true, "y_true")
    yp = check_labels(y_pred, "y_pred")
    s = check_scores(spread, "spread")
    check_same_length([y, yp, s], ["y_true", "y_pred", "spread"])
    if (s < 0).any():
        raise ValueError(f"spread must be >= 0 (a standard deviation), got a minimum of {s.min():g}")
    error = (y != yp).astype(np.int64)
    return {
        "auroc": rank_auroc(error, s),
        "n_errors": int(error.sum()),
        "n_lesions": int(y.size),
        "mean_spread_errors": float(s[error == 1].mean()) if error.any() else None,
        "mean_spread_correct": float(s[error == 0].mean()) if not error.all() else None,
    }
