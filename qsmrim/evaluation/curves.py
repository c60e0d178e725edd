"""Per-fold ROC and PR curves, averaged on a common grid (paper section 2.5, DESIGN section 7).

Each fold's curve is a step function (piecewise-constant interpolation). The curves of the folds are
evaluated on one common grid, averaged pointwise, and the area is taken of the averaged curve. By default
the grid is the union of every fold's breakpoints, so the step functions are represented exactly and the
area of the average equals the average of the per-fold areas, with no discretisation error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from qsmrim.evaluation._validation import (
    check_both_classes,
    check_fraction,
    check_groups,
    check_labels,
    check_same_length,
    check_scores,
    plain,
)
from qsmrim.evaluation.metrics import counts_by_threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AveragedCurve:
    """A curve averaged over cross-validation folds and its area.

    Attributes
    ----------
    kind : {"roc", "pr"}
        ``"roc"``: ``x`` is FPR, ``y`` is TPR (sensitivity). ``"pr"``: ``x`` is recall, ``y`` is precision.
    x : ndarray of shape (n_grid,)
        The common grid, increasing, from 0 to ``x_max``.
    y : ndarray of shape (n_grid,)
        The fold-averaged curve on ``x``.
    y_folds : ndarray of shape (n_folds, n_grid)
        Each fold's step curve on ``x``.
    folds : list
        Fold ids, in the row order of ``y_folds``.
    x_max : float
        Upper end of the integration range (``max_fpr`` or ``max_recall``).
    area : float
        Raw area under ``y`` over ``[0, x_max]``.
    auc : float
        ``area / x_max``, in [0, 1] (the number the paper prints).
    fold_auc : ndarray of shape (n_folds,)
        Each fold's normalised area.
    mcclish : float or None
        McClish standardised partial AUC (ROC only).
    """

    kind: str
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    y_folds: NDArray[np.float64]
    folds: list[Any]
    x_max: float
    area: float
    auc: float
    fold_auc: NDArray[np.float64]
    mcclish: float | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists and plain floats)."""
        return {
            "kind": self.kind,
            "x_max": float(self.x_max),
            "area": float(self.area),
            "auc": float(self.auc),
            "mcclish": None if self.mcclish is None else float(self.mcclish),
            "folds": [plain(f) for f in self.folds],
            "fold_auc": [float(v) for v in self.fold_auc],
            "x": [float(v) for v in self.x],
            "y": [float(v) for v in self.y],
        }


def roc_points(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """ROC vertices (FPR, TPR) of one fold, starting at (0, 0).

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+; both classes must be present.
    y_score : array-like of shape (n_lesions,)
        Scores, higher = more likely rim+.

    Returns
    -------
    fpr, tpr : ndarray
        One vertex per distinct score (decreasing threshold), preceded by (0, 0).
    """
    yt = check_labels(y_true, "y_true")
    check_both_classes(yt, "y_true")
    _, tp, fp = counts_by_threshold(yt, y_score)
    n_pos, n_neg = int(yt.sum()), int(yt.size - yt.sum())
    return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def pr_points(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Precision-recall vertices (recall, precision) of one fold, one per distinct score.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+; both classes must be present.
    y_score : array-like of shape (n_lesions,)
        Scores, higher = more likely rim+.

    Returns
    -------
    recall, precision : ndarray
        Vertices in order of decreasing threshold (recall non-decreasing). No artificial (0, 1) point.
    """
    yt = check_labels(y_true, "y_true")
    check_both_classes(yt, "y_true")
    _, tp, fp = counts_by_threshold(yt, y_score)
    return tp / int(yt.sum()), tp / (tp + fp)


def roc_step(grid: ArrayLike, fpr: ArrayLike, tpr: ArrayLike) -> NDArray[np.float64]:
    """Piecewise-constant (step) interpolation of an ROC curve on ``grid``.

    Notes
    -----
    :math:`\\mathrm{TPR}(f) = \\max\\{\\mathrm{tpr}_i : \\mathrm{fpr}_i \\le f\\}`: the best sensitivity reachable
    without exceeding FPR :math:`f`. The step is right-continuous (the jump happens at the vertex's FPR), so
    the area over :math:`[b_j, b_{j+1})` uses the value at the left end. A run of tied scores that contains
    both classes (a diagonal ROC segment) becomes a step at its upper end, which is the conservative
    reading of the tie.
    """
    g = np.asarray(grid, dtype=np.float64)
    f = np.asarray(fpr, dtype=np.float64)
    t = np.maximum.accumulate(np.asarray(tpr, dtype=np.float64))
    idx = np.searchsorted(f, g, side="right") - 1
    return np.where(idx >= 0, t[np.clip(idx, 0, None)], 0.0)


def pr_step(grid: ArrayLike, recall: ArrayLike, precision: ArrayLike) -> NDArray[np.float64]:
    """Piecewise-constant (step) interpolation of a precision-recall curve on ``grid``.

    Notes
    -----
    :math:`P(r)` is the precision at the highest threshold whose recall reaches :math:`r`, i.e. the
    precision at the first vertex with :math:`\\mathrm{recall}_i \\ge r`. The step is left-continuous: on
    :math:`(R_{n-1}, R_n]` it equals :math:`P_n`, so the area is
    :math:`\\sum_n (R_n - R_{n-1}) P_n`, scikit-learn's ``average_precision_score`` (no linear interpolation
    between PR vertices, which would be optimistic).
    """
    g = np.asarray(grid, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    idx = np.searchsorted(r, g, side="left")
    return p[np.clip(idx, 0, r.size - 1)]


def mcclish(area: float, max_fpr: float) -> float:
    """McClish standardised partial ROC AUC.

    Parameters
    ----------
    area : float
        Raw partial area under the ROC curve over ``FPR in [0, max_fpr]`` (not divided by ``max_fpr``).
    max_fpr : float
        Upper FPR limit, in (0, 1].

    Returns
    -------
    float
        0.5 for the chance diagonal, 1 for a perfect classifier.

    Notes
    -----
    With :math:`A` the raw partial area, :math:`A_{min} = \\mathrm{max\\_fpr}^2 / 2` (area under the
    diagonal) and :math:`A_{max} = \\mathrm{max\\_fpr}` (perfect classifier):

    .. math:: \\mathrm{sAUC} = \\frac{1}{2}\\left(1 + \\frac{A - A_{min}}{A_{max} - A_{min}}\\right)

    This is the standardisation scikit-learn's ``roc_auc_score(max_fpr=...)`` applies. With
    ``max_fpr = 1`` it returns ``area`` unchanged.

    References
    ----------
    McClish DK. Analyzing a portion of the ROC curve. Med Decis Making 1989;9(3):190-195.
    """
    m = check_fraction(max_fpr, "max_fpr")
    a_min, a_max = 0.5 * m * m, m
    return 0.5 * (1.0 + (float(area) - a_min) / (a_max - a_min))


def averaged_roc(
    y_true: ArrayLike,
    y_score: ArrayLike,
    folds: ArrayLike,
    *,
    max_fpr: float = 0.1,
    grid: ArrayLike | None = None,
) -> AveragedCurve:
    """Partial ROC curve up to ``max_fpr``, per fold, step-interpolated on a common grid and averaged.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+.
    y_score : array-like of shape (n_lesions,)
        Out-of-fold scores.
    folds : array-like of shape (n_lesions,)
        Test-fold id of each lesion. Every fold must hold both classes.
    max_fpr : float, default=0.1
        Upper FPR limit of the partial curve (the paper's clinically relevant range).
    grid : array-like, default=None
        FPR grid in ``[0, max_fpr]``. ``None`` uses the union of the folds' FPR breakpoints plus 0 and
        ``max_fpr``, which makes the area exact. A coarser grid gives a left Riemann sum of the step curves.

    Returns
    -------
    AveragedCurve
        ``kind="roc"``, ``auc = area / max_fpr`` (the paper's pROC AUC) and ``mcclish``.

    Notes
    -----
    For fold :math:`k` the step curve is :math:`T_k(f) = \\max\\{\\mathrm{tpr}_i : \\mathrm{fpr}_i \\le f\\}`
    (:func:`roc_step`). On the grid :math:`0 = b_0 < \\dots < b_m = \\mathrm{max\\_fpr}`:

    .. math::

        \\bar T(b_j) = \\frac{1}{K}\\sum_k T_k(b_j), \\qquad
        A = \\sum_{j=0}^{m-1} \\bar T(b_j)\\,(b_{j+1} - b_j), \\qquad
        \\mathrm{pAUC} = A / \\mathrm{max\\_fpr},

    and the McClish value is :func:`mcclish` of :math:`A`. Fold areas are weighted equally, whatever
    the fold sizes.
    """
    m = check_fraction(max_fpr, "max_fpr")
    per_fold = _per_fold(y_true, y_score, folds, roc_points)
    return _average_steps("roc", per_fold, m, grid, roc_step, left=True)


def averaged_pr(
    y_true: ArrayLike,
    y_score: ArrayLike,
    folds: ArrayLike,
    *,
    max_recall: float = 1.0,
    grid: ArrayLike | None = None,
) -> AveragedCurve:
    """Precision-recall curve per fold, step-interpolated on a common recall grid and averaged.

    Parameters
    ----------
    y_true : array-like of shape (n_lesions,)
        Expert labels, 1 = rim+.
    y_score : array-like of shape (n_lesions,)
        Out-of-fold scores.
    folds : array-like of shape (n_lesions,)
        Test-fold id of each lesion. Every fold must hold both classes.
    max_recall : float, default=1.0
        Upper recall limit; the area is divided by it. The paper uses the whole curve (1.0).
    grid : array-like, default=None
        Recall grid in ``[0, max_recall]``. ``None`` uses the union of the folds' recall breakpoints plus 0
        and ``max_recall`` (exact area).

    Returns
    -------
    AveragedCurve
        ``kind="pr"``, ``auc = area / max_recall`` (the paper's PR AUC), ``mcclish=None``.

    Notes
    -----
    For fold :math:`k`, :math:`P_k(r)` is the precision at the first vertex with recall :math:`\\ge r`
    (:func:`pr_step`, left-continuous). On the grid :math:`0 = b_0 < \\dots < b_m = \\mathrm{max\\_recall}`:

    .. math::

        \\bar P(b_j) = \\frac{1}{K}\\sum_k P_k(b_j), \\qquad
        A = \\sum_{j=1}^{m} \\bar P(b_j)\\,(b_j - b_{j-1}), \\qquad
        \\mathrm{AUC_{PR}} = A / \\mathrm{max\\_recall}.

    With one fold and ``max_recall=1`` this is that fold's average precision.
    """
    m = check_fraction(max_recall, "max_recall")
    per_fold = _per_fold(y_true, y_score, folds, pr_points)
    return _average_steps("pr", per_fold, m, grid, pr_step, left=False)


def _average_steps(kind: str, per_fold, m: float, grid, step, *, left: bool) -> AveragedCurve:
    """Evaluate each fold's step curve on the grid, average, and integrate.

    ``left`` sums each interval with its left value (ROC steps are right-continuous), otherwise with its right
    value (PR steps are left-continuous). ``None`` grid = every fold breakpoint in ``[0, m]`` (exact area).
    """
    if grid is None:
        x = np.unique(np.r_[0.0, m, *[a[a <= m] for _, a, _ in per_fold]])
    else:
        x = _check_grid(grid, m, "grid")
    y_folds = np.vstack([step(x, a, b) for _, a, b in per_fold])
    widths = np.diff(x)
    values = slice(None, -1) if left else slice(1, None)
    y = y_folds.mean(axis=0)
    area = float(y[values] @ widths)
    return AveragedCurve(
        kind=kind,
        x=x,
        y=y,
        y_folds=y_folds,
        folds=[k for k, _, _ in per_fold],
        x_max=m,
        area=area,
        auc=area / m,
        fold_auc=(y_folds[:, values] @ widths) / m,
        mcclish=mcclish(area, m) if kind == "roc" else None,
    )


def _per_fold(
    y_true: ArrayLike,
    y_score: ArrayLike,
    folds: ArrayLike,
    points: Callable[[ArrayLike, ArrayLike], tuple[NDArray[np.float64], NDArray[np.float64]]],
) -> list[tuple[Any, NDArray[np.float64], NDArray[np.float64]]]:
    yt = check_labels(y_true, "y_true")
    ys = check_scores(y_score, "y_score")
    fo = check_groups(folds, "folds")
    check_same_length([yt, ys, fo], ["y_true", "y_score", "folds"])
    out = []
    for k in np.unique(fo):
        sel = fo == k
        check_both_classes(yt[sel], "y_true", f" in fold {plain(k)!r}")
        xs, ys_k = points(yt[sel], ys[sel])
        out.append((plain(k), xs, ys_k))
    return out


def _check_grid(grid: ArrayLike, x_max: float, name: str) -> NDArray[np.float64]:
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 points, got shape {g.shape}")
    if not np.isfinite(g).all() or np.any(np.diff(g) <= 0):
        raise ValueError(f"{name} must be finite and strictly increasing")
    if g[0] != 0.0 or not np.isclose(g[-1], x_max):
        raise ValueError(f"{name} must run from 0 to {x_max}, got [{g[0]}, {g[-1]}]")
    return g

