"""Tests of the calibration (Brier score, reliability curve) and spread-flags-errors results and their report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from qsmrim.evaluation import (
    brier_score,
    calibration_summary,
    evaluate_predictions,
    rank_auroc,
    reliability_curve,
    render_html,
    render_markdown,
    spread_flags_errors,
)

# a hand-made table: 6 lesions, 2 equal-width bins [0, 0.5] and (0.5, 1]
_Y = [0, 0, 1, 0, 1, 1]
_P = [0.05, 0.15, 0.15, 0.55, 0.65, 0.95]


def test_brier_score_hand_table():
    """Check the Brier score of a 5-lesion table against the hand sum and scikit-learn."""
    y, p = [1, 0, 0, 1, 0], [0.9, 0.2, 0.4, 0.5, 0.0]
    # (0.1^2 + 0.2^2 + 0.4^2 + 0.5^2 + 0^2) / 5 = 0.46 / 5
    assert_allclose(brier_score(y, p), 0.092)
    assert_allclose(brier_score(y, p), brier_score_loss(y, p))


def test_calibration_summary_hand_table():
    """Check bins, mean probability, rim+ fraction, Brier, its reference and skill, and ECE by hand."""
    got = calibration_summary(_Y, _P, n_bins=2)
    rel = got["reliability"]
    assert rel["edges"] == [0.0, 0.5, 1.0] and rel["count"] == [3, 3] and rel["strategy"] == "uniform"
    assert_allclose(rel["mean_prob"], [0.35 / 3, 2.15 / 3])
    assert_allclose(rel["fraction_rim"], [1 / 3, 2 / 3])
    # squared errors 0.0025, 0.0225, 0.7225, 0.3025, 0.1225, 0.0025 -> 1.175 / 6
    assert_allclose(got["brier"], 1.175 / 6)
    assert_allclose(got["brier_reference"], 0.25)
    assert_allclose(got["brier_skill"], 1 - (1.175 / 6) / 0.25)
    # ECE = 3/6 * |0.35/3 - 1/3| + 3/6 * |2.15/3 - 2/3|
    assert_allclose(got["ece"], 0.5 * (1 / 3 - 0.35 / 3) + 0.5 * (2.15 / 3 - 2 / 3))


def test_reliability_curve_empty_bins_and_edges():
    """Check that an empty bin has count 0 and None values, and a probability on an edge joins the lower bin."""
    rel = reliability_curve([0, 1, 1], [0.0, 0.5, 1.0], n_bins=4)
    assert rel["count"] == [1, 1, 0, 1]
    assert rel["mean_prob"] == [0.0, 0.5, None, 1.0] and rel["fraction_rim"] == [0.0, 1.0, None, 1.0]


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_curve_matches_sklearn(strategy):
    """Check the non-empty bins against sklearn.calibration.calibration_curve on seeded data."""
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 3.0, 400)
    y = (rng.random(400) < p).astype(int)
    rel = reliability_curve(y, p, n_bins=8, strategy=strategy)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=8, strategy=strategy)
    keep = [i for i, c in enumerate(rel["count"]) if c]
    assert_allclose([rel["fraction_rim"][i] for i in keep], prob_true)
    assert_allclose([rel["mean_prob"][i] for i in keep], prob_pred)
    assert sum(rel["count"]) == 400
    if strategy == "quantile":
        assert max(rel["count"]) - min(rel["count"]) <= 1


@pytest.mark.parametrize(
    "kwargs, err_msg",
    [
        ({"n_bins": 0}, "n_bins must be a positive int, got 0"),
        ({"n_bins": 2.5}, "n_bins must be a positive int, got 2.5"),
        ({"strategy": "kmeans"}, "strategy must be one of \\['uniform', 'quantile'\\], got 'kmeans'"),
        ({"prob": [0.2, 1.5, 0.1]}, "prob must lie in \\[0, 1\\]"),
        ({"prob": [0.2, 0.1]}, "y_true, prob must have the same length"),
        ({"y_true": [0, 2, 1]}, "y_true must hold only 0 and 1"),
    ],
)
def test_reliability_curve_bad_input(kwargs, err_msg):
    """Check that bad bins, strategies, probabilities and labels raise ValueError naming the argument."""
    args = {"y_true": [0, 1, 1], "prob": [0.2, 0.7, 0.4], **kwargs}
    with pytest.raises(ValueError, match=err_msg):
        reliability_curve(**args)


def test_rank_auroc_matches_sklearn_with_ties():
    """Check the mid-rank AUROC against sklearn's roc_auc_score on scores with many ties."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)
    assert_allclose(rank_auroc(y, s), roc_auc_score(y, s))
    assert rank_auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None


def test_spread_flags_errors_tiny_table():
    """Check the spread AUROC for misclassified lesions against roc_auc_score and the hand means."""
    y = [1, 1, 0, 0, 0, 1, 0]
    y_pred = [1, 0, 0, 1, 0, 1, 0]
    spread = [0.01, 0.20, 0.02, 0.05, 0.02, 0.05, 0.30]
    got = spread_flags_errors(y, y_pred, spread)
    errors = [0, 1, 0, 1, 0, 0, 0]
    # errors' spreads 0.20, 0.05 against 0.01, 0.02, 0.02, 0.05, 0.30: 0.20 beats 4 of 5, 0.05 beats 3 and ties 1
    assert_allclose(got["auroc"], (4 + 3.5) / 10)
    assert_allclose(got["auroc"], roc_auc_score(errors, spread))
    assert got["n_errors"] == 2 and got["n_lesions"] == 7
    assert_allclose(got["mean_spread_errors"], 0.125)
    assert_allclose(got["mean_spread_correct"], 0.40 / 5)


@pytest.mark.parametrize("y_pred, n_errors", [([1, 0, 1, 0], 0), ([0, 1, 0, 1], 4)])
def test_spread_flags_errors_undefined_without_both(y_pred, n_errors):
    """Check that the AUROC is None when there are no errors or only errors."""
    got = spread_flags_errors([1, 0, 1, 0], y_pred, [0.1, 0.2, 0.3, 0.4])
    assert got["auroc"] is None and got["n_errors"] == n_errors


def test_spread_flags_errors_rejects_negative_spread():
    """Check that a negative spread raises ValueError naming spread."""
    with pytest.raises(ValueError, match="spread must be >= 0"):
        spread_flags_errors([1, 0], [1, 0], [0.1, -0.2])


def _table() -> pd.DataFrame:
    """Two folds, both classes in each, with a spread and a 2-of-3 vote."""
    return pd.DataFrame({
        "subject": ["a", "a", "b", "b", "c", "c", "d", "d"],
        "lesion": [1, 2, 1, 2, 1, 2, 1, 2],
        "fold": [0, 0, 0, 0, 1, 1, 1, 1],
        "rim": [1, 0, 0, 1, 1, 0, 0, 0],
        "prob": [0.8, 0.3, 0.1, 0.4, 0.9, 0.6, 0.2, 0.05],
        "spread": [0.05, 0.20, 0.01, 0.25, 0.02, 0.30, 0.03, 0.01],
        "votes": [3, 1, 0, 1, 3, 2, 0, 0],
    })  # fmt: skip


def test_evaluate_predictions_adds_calibration_and_uncertainty():
    """Check that the result carries the Brier score of the table and the spread AUROC of its vote errors."""
    df = _table()
    got = evaluate_predictions(df, protocol="given", method="qsmrimnet")
    y, p = df["rim"].to_numpy(), df["prob"].to_numpy()
    assert_allclose(got["calibration"]["brier"], np.mean((p - y) ** 2))
    assert got["calibration"]["reliability"]["n_bins"] == 10
    # votes >= 2: errors are b/2 (rim+, 1 vote) and c/2 (rim-, 2 votes)
    errors = (y != (df["votes"] >= 2)).astype(int)
    assert errors.tolist() == [0, 0, 0, 1, 0, 1, 0, 0]
    assert got["uncertainty"]["n_errors"] == 2
    assert_allclose(got["uncertainty"]["auroc"], roc_auc_score(errors, df["spread"]))
    assert "uncertainty" not in evaluate_predictions(df.drop(columns="spread"), protocol="given")


def test_evaluate_predictions_calibration_none_for_scores():
    """Check that scores outside [0, 1] (not probabilities) leave the calibration out as None."""
    df = _table().assign(prob=lambda d: d["prob"] * 10 - 5)
    assert evaluate_predictions(df, protocol="given")["calibration"] is None


def test_report_shows_calibration_and_spread_tables():
    """Check the calibration, reliability and spread tables in Markdown and HTML, with n/a for no errors."""
    df = _table()
    perfect = df.assign(votes=np.where(df["rim"] == 1, 3, 0))
    results = {
        "qsmrimnet": evaluate_predictions(df, protocol="given", method="qsmrimnet"),
        "aprl-nn": evaluate_predictions(perfect, protocol="given", method="aprl-nn"),
    }
    md = render_markdown(results, figures=("reliability.png",))
    cal = md.split("## Calibration")[1].split("##")[0]
    brier = results["qsmrimnet"]["calibration"]["brier"]
    assert f"| QSMRim-Net | {brier:.4f} | 0.2344 |" in cal  # prevalence 3/8: 3/8 * 5/8
    assert "![reliability.png](reliability.png)" in cal
    rel = md.split("## Reliability")[1].split("##")[0]
    assert "| Probability bin | QSMRim-Net | APRL (NN) |" in rel
    # bin [0, 0.1] holds prob 0.1 (on the edge) and 0.05, no rim+; nothing lies in (0.4, 0.5]
    assert f"| 0.00-0.10 | {(0.1 + 0.05) / 2:.3f} / 0.000 (2) | {(0.1 + 0.05) / 2:.3f} / 0.000 (2) |" in rel
    assert "| 0.40-0.50 | - | - |" in rel
    unc = md.split("## Does spread flag errors?")[1]
    auroc = results["qsmrimnet"]["uncertainty"]["auroc"]
    assert f"| QSMRim-Net | given | 2 | 8 | {auroc:.3f} |" in unc
    assert "| APRL (NN) | given | 0 | 8 | n/a |" in unc
    page = render_html(results)
    assert "<h2>Calibration</h2>" in page and "<h2>Does spread flag errors?</h2>" in page
