"""Tests of the CV report's lesion gallery, error list and review queue (:mod:`qsmrim.evaluation.gallery`).

The selection functions are checked against a hand table; ``evaluate_run`` on a run folder over the session's
synthetic cohort is checked against choices worked out here with NumPy from the same predictions, and against
the high-sensitivity point the report's table prints.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from review_fixtures import SEEDS, THRESHOLD, toy_predictions, toy_run

from qsmrim.evaluation.gallery import GalleryConfig, error_table, gallery_cases, review_queue
from qsmrim.training.evaluate_run import OOF_FILE, evaluate_run

# subject, lesion, fold, rim, prob, rim_pred, spread
HAND = pd.DataFrame(
    [
        ("a", 1, 0, 1, 0.95, 1, 0.02),  # TP, most confident
        ("a", 2, 0, 1, 0.70, 1, 0.10),  # TP
        ("a", 3, 0, 0, 0.80, 1, 0.05),  # FP, most confident (0.80)
        ("b", 1, 1, 0, 0.60, 1, 0.20),  # FP
        ("b", 2, 1, 1, 0.10, 0, 0.01),  # FN, most confident (0.90)
        ("b", 3, 1, 1, 0.45, 0, 0.30),  # FN
        ("c", 1, 1, 0, 0.05, 0, 0.02),  # TN, most confident (0.95)
        ("c", 2, 1, 0, 0.30, 0, 0.10),  # TN
        ("c", 3, 1, None, 0.99, 1, 0.00),  # unlabelled: never shown
    ],
    columns=["subject", "lesion", "fold", "rim", "prob", "rim_pred", "spread"],
).astype({"rim": "Int64"})
HAND["votes"] = [3, 2, 3, 2, 0, 1, 0, 1, 3]
HAND["n_members"] = 3


def test_gallery_cases_are_the_most_confident_of_each_outcome():
    """Check the gallery's TP/FP/FN/TN are the hand table's most confident lesion of each outcome."""
    cases = gallery_cases(HAND)
    got = {k: (r["subject"], int(r["lesion"])) for k, r in cases.items()}
    assert got == {"TP": ("a", 1), "FP": ("a", 3), "FN": ("b", 2), "TN": ("c", 1)}


def test_gallery_cases_missing_outcome_is_none():
    """Check that an outcome with no lesion gives None, not an error."""
    cases = gallery_cases(HAND[HAND["rim_pred"] == 0])
    assert cases["TP"] is None and cases["FP"] is None and cases["FN"] is not None


def test_error_table_is_every_error_most_confidently_wrong_first():
    """Check the error list: FN b-2 (0.90 sure), FP a-3 (0.80), FP b-1 (0.60), FN b-3 (0.55)."""
    errors = error_table(HAND)
    assert list(zip(errors["subject"], errors["lesion"], errors["kind"], strict=True)) == [
        ("b", 2, "FN"), ("a", 3, "FP"), ("b", 1, "FP"), ("b", 3, "FN")]  # fmt: skip
    np.testing.assert_allclose(errors["confidence"], [0.90, 0.80, 0.60, 0.55])
    assert {"fold", "prob", "votes", "spread"} <= set(errors.columns)


def test_review_queue_is_labelled_lesions_at_or_above_the_threshold():
    """Check that the queue at 0.6 holds the labelled lesions with prob >= 0.6, highest first (the
    unlabelled 0.99 left out, 0.60 itself kept)."""
    queue = review_queue(HAND, 0.6)
    assert list(zip(queue["subject"], queue["lesion"], strict=True)) == [("a", 1), ("a", 3), ("a", 2), ("b", 1)]


def test_gallery_needs_the_oof_columns():
    """Check that a table without rim_pred is refused naming the column."""
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['rim_pred'\]"):
        gallery_cases(HAND.drop(columns="rim_pred"))


def test_gallery_config_bad_value():
    """Check that a negative thumbnail count is refused naming the field."""
    with pytest.raises(ValueError, match="GalleryConfig.errors_drawn must be an int >= 0"):
        GalleryConfig(errors_drawn=-1)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synth_root):
    run = toy_run(tmp_path_factory.mktemp("gallery"), synth_root)
    results = evaluate_run(run)
    return run, results


def test_report_gallery_matches_the_predictions(evaluated, synth_root):
    """Check that the report's gallery shows, for APRL(NN), the TP/FP/FN/TN worked out with NumPy from the
    member predictions, each with a thumbnail written beside the report and inlined in the HTML."""
    run, _results = evaluated
    preds = toy_predictions(synth_root)
    probs = preds[[f"p{s}" for s in SEEDS]].to_numpy()
    prob = probs.mean(axis=1)
    pred = ((probs >= THRESHOLD).sum(axis=1) * 2 > len(SEEDS)).astype(int)
    rim = preds["rim"].to_numpy()
    conf = np.where(pred == 1, prob, 1 - prob)
    html = (run / "evaluation" / "report.html").read_text()
    md = (run / "evaluation" / "report.md").read_text()
    assert "Gallery: APRL (NN)" in html and "## Gallery: APRL (NN)" in md
    for kind, mask in {"TP": (rim == 1) & (pred == 1), "FP": (rim == 0) & (pred == 1),
                       "FN": (rim == 1) & (pred == 0), "TN": (rim == 0) & (pred == 0)}.items():  # fmt: skip
        assert mask.any(), f"the toy predictions should hold a {kind}"
        best = np.flatnonzero(mask)[np.argmax(conf[mask])]
        subject, lesion = preds["subject"][best], int(preds["lesion"][best])
        line = next(x for x in md.splitlines() if x.startswith(f"- {kind} "))
        assert f"subject sub-{subject}, lesion {lesion}," in line, line
        png = run / "evaluation" / "lesions" / f"sub-{subject}_lesion-{lesion}.png"
        assert png.read_bytes().startswith(b"\x89PNG")
        assert f"lesions/{png.name}" in line
    n_img = len(re.findall(r'<img class="thumb"[^>]*src="data:image/png;base64,', html))
    assert n_img >= 4
    assert "http://" not in html and "https://" not in html


def test_report_errors_list_every_error(evaluated):
    """Check that the error table lists every misclassified labelled lesion of oof.parquet once."""
    run, _ = evaluated
    oof = pd.read_parquet(run / "evaluation" / OOF_FILE)
    wrong = oof[oof["rim"].notna() & (oof["rim"] != oof["rim_pred"])]
    md = (run / "evaluation" / "report.md").read_text()
    assert f"### Errors: APRL (NN) ({len(wrong)})" in md
    section = md.split("### Errors: APRL (NN)")[1].split("### Review queue")[0]
    rows = [x for x in section.splitlines() if x.startswith("| ") and not x.startswith("| subject")]
    assert len(rows) == len(wrong)


def test_report_review_queue_is_the_high_sensitivity_point(evaluated):
    """Check the queue's length and saving against the high-sensitivity point of the report's own table, and
    its members against a brute-force count of labelled lesions at or above that threshold."""
    run, results = evaluated
    hs = results["aprl-nn"]["high_sensitivity"]
    oof = pd.read_parquet(run / "evaluation" / OOF_FILE)
    lab = oof[oof["rim"].notna()]
    n_flagged = int((lab["prob"] >= hs["threshold"]).sum())
    assert n_flagged == hs["lesions_to_review"]
    md = (run / "evaluation" / "report.md").read_text()
    assert f"### Review queue: APRL (NN) ({n_flagged})" in md
    assert f"saving {100 * (1 - n_flagged / len(lab)):.1f}% of the review" in md


def test_report_without_cohort_has_tables_but_no_thumbnails(tmp_path, synth_root):
    """Check that a run whose cohort is gone still gets the gallery tables, and says why there are no pictures."""
    run = toy_run(tmp_path, synth_root)
    (run / "config.resolved.json").write_text('{"data": {"root": "/nonexistent/cohort"}}')
    evaluate_run(run)
    html = (run / "evaluation" / "report.html").read_text()
    assert "Gallery: APRL (NN)" in html and "Thumbnails are left out" in html
    assert 'class="thumb"' not in html
    assert not (run / "evaluation" / "lesions").exists()
