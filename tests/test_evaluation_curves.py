"""Tests of the fold-averaged pROC and PR curves and the McClish standardisation."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.metrics import average_precision_score, roc_auc_score

from qsmrim.evaluation import averaged_pr, averaged_roc, mcclish, roc_points


def _fold(order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels in ``order`` of decreasing score, with distinct scores."""
    y = np.asarray(order)
    return y, np.linspace(1.0, 0.0, y.size)


def _two_folds() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # fold "a": 2 rim+, 10 rim-; ranking + - + - - - ...
    ya, sa = _fold([1, 0, 1] + [0] * 9)
    # fold "b": 3 rim+, 20 rim-; ranking + - + + - - ...
    yb, sb = _fold([1, 0, 1, 1] + [0] * 19)
    return np.r_[ya, yb], np.r_[sa, sb], np.array(["a"] * ya.size + ["b"] * yb.size)


def test_averaged_roc_matches_hand_computation():
    """Check the averaged partial ROC of two hand-made folds against the area worked out by hand.

    Fold a (10 negatives, so FPR moves in steps of 0.1): TPR = 1/2 on [0, 0.1), 1 from 0.1.
    Fold b (20 negatives, steps of 0.05):               TPR = 1/3 on [0, 0.05), 1 from 0.05.
    Common grid {0, 0.05, 0.1}; mean TPR = (1/2 + 1/3)/2 = 5/12 on [0, 0.05) and (1/2 + 1)/2 = 3/4 on
    [0.05, 0.1). Area = 0.05 * 5/12 + 0.05 * 3/4 = 0.058333..., pROC AUC = area / 0.1 = 0.58333...
    Per fold: a = 0.1 * 1/2 / 0.1 = 0.5; b = (0.05/3 + 0.05) / 0.1 = 0.6667.
    McClish: 0.5 * (1 + (0.058333 - 0.1**2/2) / (0.1 - 0.1**2/2)) = 0.780702.
    """
    y, s, f = _two_folds()
    c = averaged_roc(y, s, f, max_fpr=0.1)
    assert_allclose(c.x, [0.0, 0.05, 0.1])
    assert_allclose(c.y, [5 / 12, 3 / 4, 1.0])
    assert_allclose(c.area, 0.05 * 5 / 12 + 0.05 * 3 / 4)
    assert_allclose(c.auc, 0.5833333333)
    assert_allclose(c.fold_auc, [0.5, 2 / 3])
    assert_allclose(c.mcclish, 0.5 * (1 + (0.0583333333 - 0.005) / 0.095))
    assert c.folds == ["a", "b"]


def test_averaged_pr_matches_hand_computation():
    """Check the averaged PR curve of the same two folds against the area worked out by hand.

    Fold a (+ - + ...): precision 1 on recall (0, 1/2], 2/3 on (1/2, 1]  -> area 1/2 + 1/3 = 5/6.
    Fold b (+ - + + ...): precision 1 on (0, 1/3], 2/3 on (1/3, 2/3], 3/4 on (2/3, 1] -> area 29/36.
    Common grid {0, 1/3, 1/2, 2/3, 1}: mean precision 1, (1 + 2/3)/2 = 5/6, 2/3, (2/3 + 3/4)/2 = 17/24
    on the four intervals; area = 1/3 + (1/6)(5/6) + (1/6)(2/3) + (1/3)(17/24) = 59/72 = 0.819444...
    """
    y, s, f = _two_folds()
    c = averaged_pr(y, s, f)
    assert_allclose(c.x, [0, 1 / 3, 1 / 2, 2 / 3, 1])
    assert_allclose(c.y[1:], [1, 5 / 6, 2 / 3, 17 / 24])
    assert_allclose(c.auc, 59 / 72)
    assert_allclose(c.fold_auc, [5 / 6, 29 / 36])
    assert c.mcclish is None


def test_averaged_pr_single_fold_equals_average_precision():
    """Check that one fold's PR AUC is scikit-learn's average precision, ties included."""
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.1).astype(int)
    s = np.round(rng.random(300) + 0.5 * y, 1)  # coarse scores: many ties
    c = averaged_pr(y, s, np.zeros(300, dtype=int))
    assert_allclose(c.auc, average_precision_score(y, s))


def test_averaged_roc_full_range_single_fold_equals_roc_auc():
    """Check that with max_fpr=1 and no tied scores the step area is the ordinary ROC AUC."""
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.2).astype(int)
    s = rng.normal(size=400) + y
    c = averaged_roc(y, s, np.zeros(400, dtype=int), max_fpr=1.0)
    assert_allclose(c.auc, roc_auc_score(y, s))
    assert_allclose(c.mcclish, c.area)  # McClish is the identity at max_fpr = 1


@pytest.mark.parametrize("max_fpr", [0.1, 0.2])
def test_averaged_roc_area_of_mean_is_mean_of_areas(max_fpr):
    """Check that on the exact (union) grid the area of the averaged curve is the mean per-fold area."""
    rng = np.random.default_rng(2)
    y = (rng.random(900) < 0.08).astype(int)
    s = np.round(rng.normal(size=900) + 1.5 * y, 2)
    f = rng.integers(0, 5, 900)
    c = averaged_roc(y, s, f, max_fpr=max_fpr)
    assert_allclose(c.auc, c.fold_auc.mean())
    p = averaged_pr(y, s, f)
    assert_allclose(p.auc, p.fold_auc.mean())


def test_averaged_roc_matches_slow_step_reference():
    """Check the partial area against a slow reference: max TPR with FPR <= f, on a fine midpoint grid."""
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.15).astype(int)
    s = np.round(rng.normal(size=200) + y, 1)
    f = rng.integers(0, 3, 200)
    max_fpr = 0.1
    fine = (np.arange(20000) + 0.5) * max_fpr / 20000
    curves = []
    for k in range(3):
        yk, sk = y[f == k], s[f == k]
        pts = []
        for t in np.unique(sk):
            called = sk >= t
            pts.append(((called & (yk == 0)).sum() / (yk == 0).sum(), (called & (yk == 1)).sum() / yk.sum()))
        pts.append((0.0, 0.0))
        curves.append([max(tp for fp, tp in pts if fp <= x) for x in fine])
    reference = np.mean(curves, axis=0).mean()  # mean height over [0, max_fpr] = area / max_fpr
    assert_allclose(averaged_roc(y, s, f, max_fpr=max_fpr).auc, reference, atol=2e-3)


@pytest.mark.parametrize("area, max_fpr, expected", [(0.005, 0.1, 0.5), (0.1, 0.1, 1.0), (0.0, 0.1, 0.5 - 0.5 * 0.005 / 0.095), (0.3, 1.0, 0.3), (0.02, 0.2, 0.5)])
def test_mcclish_definition(area, max_fpr, expected):
    """Check McClish's formula: chance diagonal -> 0.5, perfect -> 1, linear in the raw area."""
    assert_allclose(mcclish(area, max_fpr), expected)


def test_mcclish_matches_sklearn_partial_auc():
    """Check that McClish of our partial area equals scikit-learn's ``roc_auc_score(max_fpr=...)``.

    Without ties the ROC is a staircase, and with ``max_fpr`` between two FPR vertices the curve is flat
    there, so sklearn's linear interpolation and our step interpolation give the same partial area.
    """
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.2).astype(int)
    s = rng.normal(size=300) + y
    n_neg = int((y == 0).sum())
    max_fpr = (int(0.1 * n_neg) + 0.5) / n_neg
    c = averaged_roc(y, s, np.zeros(300, dtype=int), max_fpr=max_fpr)
    assert_allclose(c.mcclish, roc_auc_score(y, s, max_fpr=max_fpr))


def test_averaged_roc_explicit_grid_is_left_riemann_sum():
    """Check that a user grid evaluates the step curves on it (coarse grid, hand-checked)."""
    y, s, f = _two_folds()
    c = averaged_roc(y, s, f, max_fpr=0.1, grid=[0.0, 0.1])
    assert_allclose(c.y, [5 / 12, 1.0])
    assert_allclose(c.auc, 5 / 12)


def test_roc_points_start_at_origin():
    """Check that ROC vertices begin at (0, 0) and end at (1, 1)."""
    fpr, tpr = roc_points([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.3])
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, err_msg",
    [
        ({"y_true": [1, 0, 0, 0], "y_score": [0.9, 0.1, 0.2, 0.3], "folds": [0, 0, 1, 1]}, "fold 1.*only rim- "),
        ({"y_true": [1, 0, 1, 0], "y_score": [0.9, 0.1, 0.2], "folds": [0, 0, 1, 1]}, "same length"),
        ({"y_true": [], "y_score": [], "folds": []}, "y_true is empty"),
        ({"y_true": [1, 0], "y_score": [0.9, 0.1], "folds": [0, 0], "max_fpr": 0.0}, "max_fpr must be"),
        ({"y_true": [1, 0], "y_score": [0.9, 0.1], "folds": [0, 0], "max_fpr": 1.5}, "max_fpr must be"),
        ({"y_true": [1, 0], "y_score": [0.9, 0.1], "folds": [0, 0], "grid": [0.05, 0.1]}, "grid must run from 0"),
        ({"y_true": [1, 0], "y_score": [0.9, 0.1], "folds": [0, 0], "grid": [0.0, 0.1, 0.05]}, "strictly increasing"),
    ],
)
def test_averaged_roc_bad_input(kwargs, err_msg):
    """Check that bad input, including a single-class fold, raises ValueError naming the argument."""
    with pytest.raises(ValueError, match=err_msg):
        averaged_roc(**kwargs)


@pytest.mark.parametrize(
    "kwargs, err_msg",
    [
        ({"y_true": [1, 1, 1, 0], "y_score": [0.9, 0.1, 0.2, 0.3], "folds": [0, 0, 1, 1]}, "fold 0.*only rim\\+"),
        ({"y_true": [1, 0], "y_score": [0.9, 0.1], "folds": [0, 0], "max_recall": -1}, "max_recall must be"),
    ],
)
def test_averaged_pr_bad_input(kwargs, err_msg):
    """Check that a single-class fold and a bad recall limit raise ValueError."""
    with pytest.raises(ValueError, match=err_msg):
        averaged_pr(**kwargs)
