"""The high-sensitivity operating point: how much expert review a screening threshold saves (paper 4)."""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike

from qsmrim.evaluation._validation import check_both_classes, check_fraction, check_labels
from qsmrim.evaluation.metrics import counts_by_threshold, metrics_from_counts

logger = logging.getLogger(__name__)


def high_sensitivity_point(
    y_true: ArrayLike,
    y_score: ArrayLike,
    *,
    max_sensitivity: float = 0.95,
    include_missed: bool = False,
) -> dict[str, float | int | bool]:
    """The threshold with the largest sensitivity strictly below ``max_sensitivity``.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, of all lesions (the concatenated folds).
    y_score : array-like of shape (n_lesions,)
        Out-of-fold scores, one threshold for all of them.
    max_sensitivity : float, default=0.95
        The sensitivity the point must stay below (the paper's "largest sensitivity below 0.95").
    include_missed : bool, default=False
        Count the missed rim+ lesions (FN) as reviewed too: ``lesions_to_review = TP + FP + FN``. Only this
        reproduces the paper's arithmetic (see Notes). The default counts the lesions the model flags.

    Returns
    -------
    dict
        ``threshold, sensitivity, specificity, ppv, tp, fp, fn, tn, n_lesions, lesions_to_review,
        review_saved, include_missed, max_sensitivity``. ``threshold`` is ``inf`` when even the highest score
        reaches ``max_sensitivity`` (flag nothing); ``ppv`` is ``nan`` when nothing is flagged.

    Notes
    -----
    Among the thresholds ``score >= t`` (``t`` an observed score, or ``+inf`` for "flag nothing"), take
    those with :math:`TP/P < \\mathrm{max\\_sensitivity}`, then the largest TP, then (at that TP) the
    highest threshold, which has the fewest FP. With :math:`N` lesions:

    .. math::

        \\mathrm{to\\ review} = TP + FP, \\qquad \\mathrm{saved} = 1 - \\mathrm{to\\ review} / N.

    The paper reports FP = 538, 715 lesions to review of 4,163 and 82.8 % saved. Since 715 - 538 = 177 is
    the number of *all* rim+ lesions while a sensitivity below 0.95 allows at most 168 TP, the paper
    counted :math:`FP + P = TP + FP + FN`; ``include_missed=True`` gives that convention.
    """
    yt = check_labels(y_true, "y_true")
    check_both_classes(yt, "y_true")
    limit = check_fraction(max_sensitivity, "max_sensitivity")
    thresholds, tp, fp = counts_by_threshold(yt, y_score)
    n_pos, n = int(yt.sum()), int(yt.size)
    thresholds = np.r_[np.inf, thresholds]
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    ok = tp / n_pos < limit
    best_tp = tp[ok].max()
    i = int(np.flatnonzero(ok & (tp == best_tp))[0])
    tpi, fpi = int(tp[i]), int(fp[i])
    fni, tni = n_pos - tpi, n - n_pos - fpi
    review = tpi + fpi + (fni if include_missed else 0)
    m = metrics_from_counts(tpi, fpi, fni, tni)
    return {
        "threshold": float(thresholds[i]),
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "ppv": m["ppv"],
        "tp": tpi,
        "fp": fpi,
        "fn": fni,
        "tn": tni,
        "n_lesions": n,
        "lesions_to_review": review,
        "review_saved": 1.0 - review / n,
        "include_missed": bool(include_missed),
        "max_sensitivity": limit,
    }
