"""Tests of ``evaluate_predictions`` (input format, JSON result) and the report rendering."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from qsmrim.evaluation import (
    averaged_pr,
    averaged_roc,
    classification_metrics,
    evaluate_predictions,
    paper_fold_thresholds,
    render_html,
    render_markdown,
    write_report,
)


def _predictions(separation: float, seed: int = 0, n_subjects: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        for lesion in range(int(rng.integers(3, 12))):
            rows.append((f"sub-{s:02d}", lesion, s % 5, int(rng.random() < 0.15)))
    df = pd.DataFrame(rows, columns=["subject", "lesion", "fold", "rim"])
    df["prob"] = 1 / (1 + np.exp(-(rng.normal(size=len(df)) + separation * df["rim"] - 2)))
    return df


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """Paper-protocol results for three methods, two of them ablation variants, plus one honest row."""
    out = {m: evaluate_predictions(_predictions(sep, i), method=m) for i, (m, sep) in
           enumerate([("aprl-rf", 1.0), ("image-channel", 1.5), ("qsmrimnet", 2.5)])}
    out["qsmrimnet (cross-fold)"] = evaluate_predictions(_predictions(2.5, 2), method="qsmrimnet", protocol="cross-fold")
    return out


def test_evaluate_predictions_is_consistent_with_the_building_blocks():
    """Check that the result's numbers are those of the individual functions on the same data."""
    df = _predictions(2.0)
    got = evaluate_predictions(df, method="qsmrimnet")
    thresholds = paper_fold_thresholds(df["rim"], df["prob"], df["fold"])
    pred = (df["prob"] >= df["fold"].map(thresholds)).astype(int)
    assert got["lesion"] == pytest.approx(classification_metrics(df["rim"], pred))
    assert_allclose(got["proc"]["auc"], averaged_roc(df["rim"], df["prob"], df["fold"]).auc)
    assert_allclose(got["pr"]["auc"], averaged_pr(df["rim"], df["prob"], df["fold"]).auc)
    assert got["n_lesions"] == len(df) and got["n_rim"] == int(df["rim"].sum())
    assert got["folds"] == [0, 1, 2, 3, 4]
    assert sum(got["subject"]["counts"]["expert"]) == int(df["rim"].sum())
    assert got["protocol"] == "paper" and "optimistic" in got["protocol_note"]


def test_evaluate_predictions_result_is_strict_json(results):
    """Check that every result survives ``json.dumps(allow_nan=False)`` and a round trip unchanged."""
    for r in results.values():
        assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_evaluate_predictions_given_votes():
    """Check that protocol 'given' uses rim_pred, or votes >= min_votes, as the decisions."""
    df = _predictions(2.0)
    df["votes"] = np.random.default_rng(0).integers(0, 4, len(df))
    got = evaluate_predictions(df, protocol="given")
    assert got["thresholds"] is None
    assert got["lesion"] == pytest.approx(classification_metrics(df["rim"], (df["votes"] >= 2).astype(int)))
    got3 = evaluate_predictions(df.assign(rim_pred=df["votes"] >= 3), protocol="given")
    assert got3["lesion"]["tp"] + got3["lesion"]["fp"] == int((df["votes"] >= 3).sum())


def _bad(df: pd.DataFrame, **changes) -> pd.DataFrame:
    out = df.copy()
    for col, value in changes.items():
        out[col] = value
    return out


_DF = _predictions(2.0)


@pytest.mark.parametrize(
    "predictions, kwargs, err_msg",
    [
        (_DF.drop(columns="prob"), {}, "predictions lacks columns \\['prob'\\]"),
        (_DF.iloc[:0], {}, "predictions is empty"),
        (_bad(_DF, rim=2), {}, "predictions\\['rim'\\] must hold only 0 and 1"),
        (_bad(_DF, prob=np.nan), {}, "predictions\\['prob'\\] must be finite"),
        (pd.concat([_DF, _DF.iloc[:1]]), {}, "repeats \\(subject, lesion\\)"),
        (_bad(_DF, fold=np.arange(len(_DF)) % 5), {}, "more than one fold"),
        (_bad(_DF, rim=np.where(_DF["fold"] == 3, 0, _DF["rim"])), {}, "fold 3 holds only rim- "),
        (_DF, {"protocol": "best"}, "protocol must be one of"),
        (_DF, {"protocol": "honest"}, "protocol='honest' needs selection"),
        (_DF, {"protocol": "given"}, "needs a 'rim_pred' or 'votes' column"),
        (_DF, {"selection": _DF}, "selection is only used with protocol='honest'"),
        (_DF, {"protocol": "honest", "selection": _DF[_DF["fold"] < 4].drop(columns="subject")}, "no rows for folds \\[4\\]"),
        (_bad(_DF, threshold=np.arange(len(_DF)) / len(_DF)), {"protocol": "honest"}, "constant within a fold"),
        (_DF.to_dict("list"), {}, "predictions must be a pandas DataFrame"),
    ],
)
def test_evaluate_predictions_bad_input(predictions, kwargs, err_msg):
    """Check that malformed predictions and options raise ValueError naming the column or option."""
    with pytest.raises(ValueError, match=err_msg):
        evaluate_predictions(predictions, **kwargs)


def test_render_markdown_tables(results):
    """Check the Markdown report: Table 2 rows for every result, Table 3 for the ablation variants."""
    md = render_markdown(results)
    for name in ("APRL (RF)", "Image only, channel fusion", "QSMRim-Net", "QSMRim-Net (cross-fold)"):
        assert f"| {name} |" in md
    assert "## Ablation (Table 3)" in md
    table3 = md.split("## Ablation (Table 3)")[1].split("##")[0]
    assert "APRL" not in table3 and table3.index("| Image only") < table3.index("| QSMRim-Net |")
    assert "![proc.png](proc.png)" in md and "![counts.png](counts.png)" in md
    # the curve table lists each method once, ranked by PR AUC
    curve = md.split("## pROC and PR AUC")[1].split("##")[0]
    assert curve.count("QSMRim-Net") == 1
    assert re.search(r"\| 1 \| QSMRim-Net \|", curve)


def test_render_markdown_without_ablation_variants(results):
    """Check that Table 3 is left out when fewer than two ablation variants were run."""
    md = render_markdown({"aprl-rf": results["aprl-rf"], "qsmrimnet": results["qsmrimnet"]}, figures=())
    assert "Table 3" not in md and "![" not in md


def test_render_html_is_self_contained(results):
    """Check that the HTML inlines its figures as data URIs and links nothing outside the page."""
    page = render_html(results, figures={"proc.png": b"\x89PNG fake", "counts.png": b"\x89PNG fake2"})
    assert page.startswith("<!DOCTYPE html>")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http" not in page
    assert "&lt;" not in render_html({"<b>": results["aprl-rf"]}).split("<body>")[0]


def test_render_rejects_bad_results():
    """Check that an empty mapping or something that is not an evaluation result raises ValueError."""
    with pytest.raises(ValueError, match="non-empty mapping"):
        render_markdown({})
    with pytest.raises(ValueError, match="results\\['x'\\] lacks"):
        render_html({"x": {"protocol": "paper"}})


def test_write_report_files(results, tmp_path):
    """Check that write_report writes the Markdown, the self-contained HTML, real PNGs and the JSON."""
    pytest.importorskip("matplotlib")
    small = {k: results[k] for k in ("aprl-rf", "qsmrimnet")}
    written = write_report(small, tmp_path / "report")
    pngs = ("proc.png", "pr.png", "counts.png", "reliability.png")
    assert set(written) == {"report.md", "report.html", "evaluation.json", *pngs}
    for name in pngs:
        assert written[name].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    page = written["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 4
    assert json.loads(written["evaluation.json"].read_text()) == small


def test_import_leaves_heavy_frameworks_out():
    """Check that importing qsmrim.evaluation imports no Ray, Dask, MLflow, torch or matplotlib."""
    code = (
        "import sys, qsmrim.evaluation\n"
        "print(sorted(m for m in ('ray', 'dask', 'mlflow', 'torch', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
