"""Subject-level agreement: predicted vs expert rim+ counts (paper section 3.2, Fig. 7)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from qsmrim.evaluation._validation import check_fraction, check_groups, check_labels, check_same_length

logger = logging.getLogger(__name__)


def subject_counts(subjects: ArrayLike, y_true: ArrayLike, y_pred: ArrayLike) -> pd.DataFrame:
    """Expert and predicted rim+ counts per subject.

    Parameters
    ----------
    subjects : array-like of shape (n_lesions,)
        Subject id of each lesion.
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+.
    y_pred : array-like of shape (n_lesions,)
        Predicted labels, 1 = rim+.

    Returns
    -------
    DataFrame
        Columns ``subject, expert, predicted`` (ints), one row per subject, sorted by subject.
        Subjects with no lesion at all are not in the input and so not in the table.
    """
    su = check_groups(subjects, "subjects")
    yt = check_labels(y_true, "y_true")
    yp = check_labels(y_pred, "y_pred")
    check_same_length([su, yt, yp], ["subjects", "y_true", "y_pred"])
    df = pd.DataFrame({"subject": su, "expert": yt, "predicted": yp})
    return df.groupby("subject", sort=True, as_index=False)[["expert", "predicted"]].sum()


def pearson_ci(x: ArrayLike, y: ArrayLike, *, confidence: float = 0.95) -> dict[str, float]:
    """Pearson correlation with a Fisher-z confidence interval.

    Parameters
    ----------
    x, y : array-like of shape (n,)
        Paired values (expert and predicted counts); ``n >= 4``.
    confidence : float, default=0.95
        Confidence level of the interval, in (0, 1).

    Returns
    -------
    dict
        ``r, ci_low, ci_high, n``. When either input is constant, r is undefined: all three are ``nan``
        and a warning is logged.

    Notes
    -----
    With :math:`z = \\operatorname{artanh} r`, :math:`\\mathrm{SE} = 1/\\sqrt{n - 3}` and
    :math:`q = \\Phi^{-1}\\big((1 + \\mathrm{confidence})/2\\big)`:

    .. math:: [\\tanh(z - q\\,\\mathrm{SE}),\\; \\tanh(z + q\\,\\mathrm{SE})],

    the same interval as ``scipy.stats.pearsonr(x, y).confidence_interval(confidence)``.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    for name, a in (("x", xa), ("y", ya)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite")
    check_same_length([xa, ya], ["x", "y"])
    level = check_fraction(confidence, "confidence", high_closed=False)
    n = int(xa.size)
    if n < 4:
        raise ValueError(f"x and y need at least 4 pairs for a Fisher-z interval, got {n}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        logger.warning("Pearson r is undefined: %s is constant over %d subjects", "x" if np.ptp(xa) == 0 else "y", n)
        return {"r": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
    xc, yc = xa - xa.mean(), ya - ya.mean()
    r = float(np.clip((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)), -1.0, 1.0))
    z = math.atanh(r) if abs(r) < 1 else math.copysign(math.inf, r)
    half = float(stats.norm.ppf(0.5 + level / 2)) / math.sqrt(n - 3)
    return {"r": r, "ci_low": math.tanh(z - half), "ci_high": math.tanh(z + half), "n": n}


def count_agreement(
    subjects: ArrayLike, y_true: ArrayLike, y_pred: ArrayLike, *, confidence: float = 0.95
) -> dict[str, float | int]:
    """Pearson r (with CI) and MSE between predicted and expert rim+ counts per subject.

    Parameters
    ----------
    subjects : array-like of shape (n_lesions,)
        Subject id of each lesion.
    y_true, y_pred : array-like of shape (n_lesions,)
        Expert and predicted labels, 1 = rim+.
    confidence : float, default=0.95
        Level of the Fisher-z interval.

    Returns
    -------
    dict
        ``r, ci_low, ci_high, confidence, mse, n_subjects``.

    Notes
    -----
    With :math:`e_s` the expert and :math:`p_s` the predicted count of subject :math:`s` over :math:`S`
    subjects, :math:`\\mathrm{MSE} = \\frac{1}{S}\\sum_s (p_s - e_s)^2`; r and its interval are
    :func:`pearson_ci` of :math:`(e_s, p_s)`.
    """
    table = subject_counts(subjects, y_true, y_pred)
    e = table["expert"].to_numpy(dtype=np.float64)
    p = table["predicted"].to_numpy(dtype=np.float64)
    ci = pearson_ci(e, p, confidence=confidence)
    return {
        "r": ci["r"],
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "confidence": float(confidence),
        "mse": float(np.mean((p - e) ** 2)),
        "n_subjects": int(len(table)),
    }
