"""Tests of the decision thresholds: the paper's per-fold F1 maximum and the honest variants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_array_equal
from sklearn.metrics import f1_score

from qsmrim.evaluation import (
    apply_fold_thresholds,
    cross_fold_thresholds,
    evaluate_predictions,
    f1_optimal_threshold,
    honest_fold_thresholds,
    paper_fold_thresholds,
)


def _cohort(seed: int = 0, n_subjects: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for lesion in range(int(rng.integers(4, 15))):
            rows.append((f"sub-{s:02d}", lesion, s % 4, int(rng.random() < 0.2)))
    df = pd.DataFrame(rows, columns=["subject", "lesion", "fold", "rim"])
    df["prob"] = np.round(1 / (1 + np.exp(-(rng.normal(size=len(df)) + 2 * df["rim"] - 1.5))), 2)
    return df


@pytest.mark.parametrize("seed", range(5))
def test_f1_optimal_threshold_matches_brute_force(seed):
    """Check the F1 maximum against trying every observed score with scikit-learn's f1_score."""
    rng = np.random.default_rng(seed)
    y = (rng.random(120) < 0.2).astype(int)
    y[:2] = [0, 1]
    s = np.round(rng.random(120) + 0.4 * y, 1)  # ties
    f1s = {t: f1_score(y, (s >= t).astype(int)) for t in np.unique(s)}
    best = max(f1s.values())
    t, f1 = f1_optimal_threshold(y, s)
    assert f1 == pytest.approx(best)
    assert t == max(k for k, v in f1s.items() if np.isclose(v, best))  # the highest maximiser


def test_paper_fold_thresholds_use_each_fold_alone():
    """Check that the paper protocol picks each fold's threshold on that fold's own lesions."""
    df = _cohort()
    got = paper_fold_thresholds(df["rim"], df["prob"], df["fold"])
    for k, part in df.groupby("fold"):
        assert got[k] == f1_optimal_threshold(part["rim"], part["prob"])[0]
    assert set(got) == {0, 1, 2, 3}
    assert all(type(k) is int for k in got)


def test_cross_fold_thresholds_use_the_other_folds():
    """Check that fold k's cross-fold threshold is the F1 maximum over all folds but k."""
    df = _cohort()
    got = cross_fold_thresholds(df["rim"], df["prob"], df["fold"])
    for k in range(4):
        rest = df[df["fold"] != k]
        assert got[k] == f1_optimal_threshold(rest["rim"], rest["prob"])[0]


def test_cross_fold_thresholds_never_look_at_the_test_fold_labels():
    """Check that rewriting fold k's labels leaves fold k's honest threshold unchanged (but not the paper's)."""
    df = _cohort()
    flipped = df.copy()
    in_0 = flipped["fold"] == 0
    flipped.loc[in_0, "rim"] = 1 - flipped.loc[in_0, "rim"]
    before = cross_fold_thresholds(df["rim"], df["prob"], df["fold"])
    after = cross_fold_thresholds(flipped["rim"], flipped["prob"], flipped["fold"])
    assert after[0] == before[0]
    paper_before = paper_fold_thresholds(df["rim"], df["prob"], df["fold"])
    paper_after = paper_fold_thresholds(flipped["rim"], flipped["prob"], flipped["fold"])
    assert paper_after[0] != paper_before[0]  # the paper protocol does look at them


def _flagged_per_fold(result: dict) -> dict:
    return {r["fold"]: r["tp"] + r["fp"] for r in result["lesion_per_fold"]}


def test_evaluate_honest_decisions_ignore_every_test_label():
    """Check that rewriting all test labels changes neither honest thresholds nor the lesions called rim+."""
    df = _cohort(1)
    selection = _cohort(2).assign(subject=lambda d: "inner-" + d["subject"])
    base = evaluate_predictions(df, protocol="honest", selection=selection)
    changed = df.assign(rim=np.random.default_rng(0).permutation(1 - df["rim"].to_numpy()))
    got = evaluate_predictions(changed, protocol="honest", selection=selection)
    assert got["thresholds"] == base["thresholds"]
    assert _flagged_per_fold(got) == _flagged_per_fold(base)
    assert got["lesion"] != base["lesion"]  # the labels are still the reference of the metrics


@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_evaluate_cross_fold_decisions_ignore_own_test_labels(fold):
    """Check that rewriting fold k's labels leaves fold k's cross-fold threshold and decisions unchanged."""
    df = _cohort(1)
    base = evaluate_predictions(df, protocol="cross-fold")
    changed = df.copy()
    sel = changed["fold"] == fold
    changed.loc[sel, "rim"] = 1 - changed.loc[sel, "rim"]
    got = evaluate_predictions(changed, protocol="cross-fold")
    assert [t for t in got["thresholds"] if t["fold"] == fold] == [t for t in base["thresholds"] if t["fold"] == fold]
    assert _flagged_per_fold(got)[fold] == _flagged_per_fold(base)[fold]


def test_honest_fold_thresholds_take_no_test_labels():
    """Check that honest thresholds are computed from the selection data alone."""
    sel = _cohort(3)
    got = honest_fold_thresholds(sel["rim"], sel["prob"], sel["fold"])
    for k, part in sel.groupby("fold"):
        assert got[k] == f1_optimal_threshold(part["rim"], part["prob"])[0]


def test_evaluate_honest_rejects_selection_from_the_test_fold():
    """Check that a selection subject lying in the test fold it selects for is refused as a leak."""
    df = _cohort()
    leaky = df[df["fold"] == 1].copy()  # fold 1's own test subjects selecting fold 1's threshold
    with pytest.raises(ValueError, match="selection leaks the test fold"):
        evaluate_predictions(df, protocol="honest", selection=leaky)


def test_evaluate_honest_with_threshold_column():
    """Check that a per-fold 'threshold' column is applied as given."""
    df = _cohort().assign(threshold=lambda d: 0.3 + 0.1 * d["fold"])
    got = evaluate_predictions(df, protocol="honest")
    assert [t["threshold"] for t in got["thresholds"]] == pytest.approx([0.3, 0.4, 0.5, 0.6])
    pred = (df["prob"] >= df["threshold"]).to_numpy()
    assert got["lesion"]["tp"] == int((pred & (df["rim"] == 1)).sum())


def test_apply_fold_thresholds():
    """Check that ``score >= threshold`` is applied per fold (equality counts as rim+)."""
    got = apply_fold_thresholds([0.5, 0.4, 0.5, 0.7], [0, 0, 1, 1], {0: 0.5, 1: 0.6})
    assert_array_equal(got, [1, 0, 0, 1])


@pytest.mark.parametrize(
    "func, args, err_msg",
    [
        (f1_optimal_threshold, ([0, 0, 0], [0.1, 0.2, 0.3]), "y_true holds only rim- "),
        (f1_optimal_threshold, ([0, 1], [0.1]), "same length"),
        (paper_fold_thresholds, ([0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]), "in fold 1 holds only rim\\+"),
        (cross_fold_thresholds, ([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0]), "at least 2 folds"),
        (honest_fold_thresholds, ([0, 0], [0.1, 0.2], [3, 3]), "selection_true for fold 3 holds only"),
        (honest_fold_thresholds, ([0, 1], [0.1, 0.2], [3]), "selection_true, selection_score, selection_folds"),
        (apply_fold_thresholds, ([0.1, 0.2], [0, 1], {0: 0.5}), "no entry for folds \\[1\\]"),
    ],
)
def test_thresholds_bad_input(func, args, err_msg):
    """Check that single-class data, length mismatches and missing folds raise ValueError."""
    with pytest.raises(ValueError, match=err_msg):
        func(*args)
