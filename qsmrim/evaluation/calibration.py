"""Calibration of out-of-fold rim+ probabilities: Brier score and reliability curve.

The paper reports rankings and thresholded decisions only; calibration says whether ``prob = 0.3`` means
that about 3 in 10 such lesions are rim+, which matters to a reader of the review page who sees the
probability next to each lesion.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from qsmrim.evaluation._validation import check_labels, check_same_length, check_scores

logger = logging.getLogger(__name__)

BIN_STRATEGIES: tuple[str, ...] = ("uniform", "quantile")
"""Reliability bins: equal-width on [0, 1] (shared by every method) or equal-count (quantiles of ``prob``)."""


def brier_score(y_true: ArrayLike, prob: ArrayLike) -> float:
    """Mean squared difference between the rim+ probability and the expert label.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, 0 = rim-.
    prob : array-like of shape (n_lesions,)
        Predicted rim+ probabilities in [0, 1].

    Returns
    -------
    float
        In [0, 1]; 0 is perfect, lower is better.

    Notes
    -----
    :math:`B = \\frac{1}{N} \\sum_i (p_i - y_i)^2`. Predicting the prevalence :math:`\\pi` for every lesion
    scores :math:`\\pi (1 - \\pi)` (the reference of :func:`calibration_summary`).

    Examples
    --------
    >>> round(brier_score([1, 0, 0, 1], [0.9, 0.2, 0.4, 0.5]), 6)
    0.115
    """
    y, p = _check(y_true, prob)
    return float(np.mean((p - y) ** 2))


def reliability_curve(y_true: ArrayLike, prob: ArrayLike, *, n_bins: int = 10,
                      strategy: str = "uniform") -> dict[str, Any]:  # fmt: skip
    """Observed rim+ fraction against mean predicted probability, per probability bin.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, 0 = rim-.
    prob : array-like of shape (n_lesions,)
        Predicted rim+ probabilities in [0, 1].
    n_bins : int, default=10
        Number of bins.
    strategy : {"uniform", "quantile"}, default="uniform"
        ``"uniform"``: equal-width bins on [0, 1]. ``"quantile"``: edges at the quantiles of ``prob``, so
        the bins hold about the same number of lesions (tied probabilities can leave some empty).

    Returns
    -------
    dict
        ``strategy``, ``n_bins``, ``edges`` (``n_bins + 1`` floats), and per bin ``count``, ``mean_prob``
        and ``fraction_rim`` (``None`` for an empty bin).

    Notes
    -----
    Bin :math:`b` holds the lesions with :math:`e_{b-1} < p \\le e_b`; the first bin also holds
    :math:`p = e_0` (the convention of :func:`sklearn.calibration.calibration_curve`). A calibrated model's
    points lie on the diagonal ``fraction_rim = mean_prob``.
    """
    y, p = _check(y_true, prob)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if strategy not in BIN_STRATEGIES:
        raise ValueError(f"strategy must be one of {list(BIN_STRATEGIES)}, got {strategy!r}")
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.percentile(p, np.linspace(0.0, 100.0, n_bins + 1))
    idx = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    nonempty = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.where(nonempty, sum_p / np.maximum(count, 1), np.nan)
        fraction = np.where(nonempty, sum_y / np.maximum(count, 1), np.nan)
    return {
        "strategy": strategy,
        "n_bins": int(n_bins),
        "edges": [float(e) for e in edges],
        "count": [int(c) for c in count],
        "mean_prob": [float(v) if np.isfinite(v) else None for v in mean_prob],
        "fraction_rim": [float(v) if np.isfinite(v) else None for v in fraction],
    }


def calibration_summary(y_true: ArrayLike, prob: ArrayLike, *, n_bins: int = 10,
                        strategy: str = "uniform") -> dict[str, Any]:  # fmt: skip
    """Brier score, its prevalence reference and skill, expected calibration error and the reliability curve.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+, 0 = rim-.
    prob : array-like of shape (n_lesions,)
        Predicted rim+ probabilities in [0, 1].
    n_bins : int, default=10
        Reliability bins (see :func:`reliability_curve`).
    strategy : {"uniform", "quantile"}, default="uniform"
        Reliability bin edges (see :func:`reliability_curve`).

    Returns
    -------
    dict
        ``brier``, ``brier_reference`` (:math:`\\pi(1-\\pi)`, every lesion given the prevalence),
        ``brier_skill`` (:math:`1 - B / B_{ref}`, ``None`` when the reference is 0), ``ece`` and
        ``reliability`` (the :func:`reliability_curve` dict).

    Notes
    -----
    Expected calibration error over the reliability bins:
    :math:`\\mathrm{ECE} = \\sum_b \\frac{n_b}{N} \\lvert \\bar p_b - \\bar y_b \\rvert`.
    """
    y, p = _check(y_true, prob)
    curve = reliability_curve(y, p, n_bins=n_bins, strategy=strategy)
    brier = brier_score(y, p)
    prevalence = float(y.mean())
    reference = prevalence * (1.0 - prevalence)
    ece = sum(c / y.size * abs(m - f) for c, m, f in zip(curve["count"], curve["mean_prob"], curve["fraction_rim"],
                                                        strict=True) if c)  # fmt: skip
    return {
        "brier": brier,
        "brier_reference": reference,
        "brier_skill": 1.0 - brier / reference if reference > 0 else None,
        "ece": float(ece),
        "reliability": curve,
    }


def _check(y_true: ArrayLike, prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = check_labels(y_true, "y_true")
    p = check_scores(prob, "prob")
    check_same_length([y, p], ["y_true", "prob"])
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"prob must lie in [0, 1], got values from {p.min():g} to {p.max():g}")
    return y, p
