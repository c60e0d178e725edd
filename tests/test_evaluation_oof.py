"""Tests of the per-lesion out-of-fold table (``oof_table``, ``oof.parquet``) written by ``qsmrim evaluate``.

The run folders hold real members (tiny APRL(NN) weights as safetensors, an APRL(RF) as skops) saved and
loaded by :class:`~qsmrim.training.member.Member`; their test-fold predictions are a hand-made table, so
every expected number below is worked out from that table with NumPy, not with the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from sklearn.metrics import roc_auc_score

from qsmrim.cli import main
from qsmrim.models import build_model
from qsmrim.training.ensemble import fold_ensemble_predictions, oof_table
from qsmrim.training.evaluate_run import OOF_FILE, evaluate_run
from qsmrim.training.layout import member_dir
from qsmrim.training.member import Member

# lesions of each fold as (subject, lesion, rim); rim -1 is "n/a" (unlabelled)
LESIONS = {
    0: [("sub-a", 1, 1), ("sub-a", 2, 0), ("sub-a", 3, -1), ("sub-b", 1, 0), ("sub-b", 2, 1)],
    1: [("sub-c", 1, 1), ("sub-c", 2, 0), ("sub-c", 3, 0), ("sub-d", 1, -1), ("sub-d", 2, 1)],
}
# PROBS[fold][seed] in the lesion order above
PROBS = {
    0: {0: [0.9, 0.2, 0.5, 0.6, 0.6], 1: [0.7, 0.4, 0.5, 0.5, 0.8], 2: [0.8, 0.3, 0.2, 0.2, 0.1]},
    1: {0: [0.6, 0.5, 0.1, 0.7, 0.9], 1: [0.9, 0.2, 0.2, 0.6, 0.3], 2: [0.3, 0.6, 0.1, 0.5, 0.6]},
}
# under the paper thresholds below the ensemble gets sub-b 1 wrong (rim-, 2 votes) and sub-d 2 (rim+, 1 vote)
PAPER = {0: {0: 0.5, 1: 0.45, 2: 0.25}, 1: {0: 0.55, 1: 0.35, 2: 0.7}}
HONEST = 0.5
NN_KWARGS = {"n_radiomics": 2, "base_channels": 4}
RF_KWARGS = {"n_estimators": 2, "features": ["f0", "f1"]}
COLUMNS = ["model", "subject", "lesion", "fold", "rim", "prob_seed0", "prob_seed1", "prob_seed2", "prob", "spread",
           "n_members", "votes", "rim_pred", "votes_honest", "rim_pred_honest"]  # fmt: skip


def _member(model: str, fold: int, seed: int, probs=None, *, honest: bool = True) -> Member:
    rows = LESIONS[fold]
    preds = pd.DataFrame({"subject": [r[0] for r in rows], "lesion": [r[1] for r in rows], "fold": fold,
                          "seed": seed, "rim": [r[2] for r in rows],
                          "prob": probs if probs is not None else PROBS[fold][seed]})  # fmt: skip
    thresholds = {"paper": PAPER[fold][seed], **({"honest": HONEST} if honest else {})}
    kwargs = NN_KWARGS if model == "aprl-nn" else RF_KWARGS
    return Member(model, kwargs, fold, seed, thresholds, None, (), model=build_model(model, **kwargs),
                  predictions=preds)  # fmt: skip


def _nn_members() -> list[Member]:
    return [_member("aprl-nn", f, s) for f in (0, 1) for s in (0, 1, 2)]


def _rf_probs(fold: int, seed: int) -> list[float]:
    return [round(1 - p, 2) if r == 0 else p for p, (_, _, r) in zip(PROBS[fold][seed], LESIONS[fold], strict=True)]


def _rf_members() -> list[Member]:
    """APRL(RF): only paper thresholds, and fold 1 has no seed 2."""
    return [_member("aprl-rf", f, s, _rf_probs(f, s), honest=False) for f, s in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with 6 APRL(NN) and 5 APRL(RF) members saved as training saves them."""
    run = tmp_path_factory.mktemp("run") / "toy"
    for m in _nn_members() + _rf_members():
        m.save(member_dir(run, m.model_name, m.fold, m.seed))
    return run


@pytest.fixture(scope="module")
def evaluated(run_dir):
    results = evaluate_run(run_dir, with_figures=False)
    return results, pd.read_parquet(run_dir / "evaluation" / OOF_FILE)


def test_oof_table_hand_values():
    """Check member columns, mean, population std, votes at each member's own threshold, by hand."""
    oof = oof_table(_nn_members()).set_index(["subject", "lesion"])
    a1 = oof.loc[("sub-a", 1)]
    assert [a1["prob_seed0"], a1["prob_seed1"], a1["prob_seed2"]] == [0.9, 0.7, 0.8]
    assert_allclose(a1["prob"], 0.8)
    assert_allclose(a1["spread"], np.sqrt((0.1**2 + 0.1**2 + 0.0**2) / 3))
    # sub-b 2: 0.6 >= 0.5, 0.8 >= 0.45, 0.1 < 0.25 -> 2 of 3 (paper); honest 0.5: 0.6, 0.8 -> 2
    b2 = oof.loc[("sub-b", 2)]
    assert (b2["votes"], b2["rim_pred"], b2["votes_honest"], b2["rim_pred_honest"]) == (2, 1, 2, 1)
    # sub-c 2: 0.5 < 0.55, 0.2 < 0.35, 0.6 < 0.7 -> 0 (paper); honest 0.5: 0.5, 0.6 -> 2
    c2 = oof.loc[("sub-c", 2)]
    assert (c2["votes"], c2["rim_pred"], c2["votes_honest"], c2["rim_pred_honest"]) == (0, 0, 2, 1)
    assert pd.isna(oof.loc[("sub-a", 3), "rim"]) and oof.loc[("sub-d", 2), "rim"] == 1
    assert str(oof["rim"].dtype) == "Int64" and (oof["n_members"] == 3).all()


def test_oof_table_agrees_with_the_fold_ensemble():
    """Check that prob, spread and votes of the table are those the evaluation uses."""
    members = _nn_members()
    oof = oof_table(members).set_index(["subject", "lesion"])
    for protocol, col in (("paper", "votes"), ("honest", "votes_honest")):
        ens = fold_ensemble_predictions(members, protocol).set_index(["subject", "lesion"])
        assert_allclose(oof.loc[ens.index, "prob"], ens["prob"])
        assert_allclose(oof.loc[ens.index, "spread"], ens["spread"])
        assert oof.loc[ens.index, col].tolist() == ens["votes"].tolist()


@pytest.mark.parametrize(
    "members, err_msg",
    [
        ([], "no members to tabulate"),
        ([_member("aprl-nn", 0, 0), _member("aprl-rf", 0, 1, _rf_probs(0, 1))], "one model, got \\['aprl-nn', 'aprl-rf'\\]"),
        ([_member("aprl-nn", 0, 0), _member("aprl-nn", 0, 0)], "member-fold=0-seed=0 appears twice"),
        ([Member("aprl-nn", {}, 0, 0, {"paper": 0.5}, None, ())], "member-fold=0-seed=0 has no test-fold predictions"),
    ],
)
def test_oof_table_bad_members(members, err_msg):
    """Check that empty, mixed, repeated or prediction-less members raise ValueError naming the member."""
    with pytest.raises(ValueError, match=err_msg):
        oof_table(members)


def test_evaluate_writes_every_lesion_once(evaluated, run_dir):
    """Check oof.parquet: the documented columns, one row per (model, lesion), labelled and unlabelled."""
    _, oof = evaluated
    assert list(oof.columns) == COLUMNS
    lesions = {(s, k) for rows in LESIONS.values() for s, k, _ in rows}
    assert len(lesions) == 10
    for model in ("aprl-nn", "aprl-rf"):
        part = oof[oof["model"] == model]
        assert len(part) == 10 and not part.duplicated(["subject", "lesion"]).any()
        assert set(zip(part["subject"], part["lesion"], strict=True)) == lesions
        assert int(part["rim"].isna().sum()) == 2
    assert not [p for p in (run_dir / "evaluation").iterdir() if p.name.startswith(".")]  # no temp file left


def test_evaluate_oof_values_match_the_member_predictions(evaluated):
    """Check each member's column, the ensemble mean and std against the input table, and missing seeds."""
    _, oof = evaluated
    nn = oof[oof["model"] == "aprl-nn"]
    for fold in (0, 1):
        part = nn[nn["fold"] == fold].set_index(["subject", "lesion"]).loc[[(s, k) for s, k, _ in LESIONS[fold]]]
        stacked = np.array([PROBS[fold][s] for s in (0, 1, 2)])
        for s in (0, 1, 2):
            assert_allclose(part[f"prob_seed{s}"], PROBS[fold][s])
        assert_allclose(part["prob"], stacked.mean(axis=0))
        assert_allclose(part["spread"], stacked.std(axis=0))
    rf = oof[oof["model"] == "aprl-rf"]
    assert rf.loc[rf["fold"] == 1, "prob_seed2"].isna().all() and rf.loc[rf["fold"] == 0, "prob_seed2"].notna().all()
    assert (rf.loc[rf["fold"] == 1, "n_members"] == 2).all()
    assert rf["votes_honest"].isna().all() and nn["votes_honest"].notna().all()


def test_evaluate_brier_and_spread_auroc(evaluated, run_dir):
    """Check the Brier score and the spread AUROC of the paper result against NumPy and scikit-learn."""
    results, oof = evaluated
    y = np.array([r for f in (0, 1) for _, _, r in LESIONS[f]])
    prob = np.concatenate([np.mean([PROBS[f][s] for s in (0, 1, 2)], axis=0) for f in (0, 1)])
    labelled = y >= 0
    brier = np.mean((prob[labelled] - y[labelled]) ** 2)
    assert_allclose(results["aprl-nn"]["calibration"]["brier"], brier)
    assert_allclose(results["aprl-nn [honest]"]["calibration"]["brier"], brier)  # prob does not depend on it
    nn = oof[(oof["model"] == "aprl-nn") & oof["rim"].notna()]
    errors = (nn["rim"].astype(int) != nn["rim_pred"].astype(int)).astype(int)
    assert errors.sum() == 2
    unc = results["aprl-nn"]["uncertainty"]
    assert unc["n_errors"] == int(errors.sum()) and unc["n_lesions"] == 8
    assert_allclose(unc["auroc"], roc_auc_score(errors, nn["spread"]))
    saved = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert saved["aprl-nn"]["uncertainty"] == unc
    md = (run_dir / "evaluation" / "report.md").read_text()
    assert "## Calibration" in md and "## Reliability" in md and "## Does spread flag errors?" in md


def test_cli_evaluate_names_the_oof_table(run_dir, tmp_path, capsys):
    """Check that ``qsmrim evaluate --out`` writes oof.parquet there and prints its path."""
    out = tmp_path / "eval"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--no-figures"]) == 0
    assert (out / OOF_FILE).exists() and (out / "report.html").exists()
    assert f"per-lesion table: {out / OOF_FILE}" in capsys.readouterr().out
