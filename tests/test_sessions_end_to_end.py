"""Issue 19's done-when: a session-structured BIDS cohort (``qsmrim synth --sessions 2``) goes through validate,
features, grid, evaluate, export and predict on the tiny ``ci.yaml``, entities intact, no subject split across folds.

Every stage runs through the ``qsmrim`` command line, as a user types it, on a real local Ray and a real MLflow
sqlite store.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import REPO
from qsmrim.cli import main

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

CI = REPO / "platform" / "experiments" / "ci.yaml"
SCANS = [f"00{s}_ses-0{k}" for s in range(1, 7) for k in (1, 2)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def _subject(scan: str) -> str:
    return scan.split("_")[0]


def test_session_cohort_through_every_stage(local_ray, tmp_path, monkeypatch, capsys):
    """Check that scan ids (sub-X_ses-Y) survive every stage, both sessions of a subject always share a fold,
    and predictions are written under sub-X/ses-Y/anat with scans.tsv and participants.tsv."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    root = tmp_path / "bids"
    assert main(["synth", str(root), "--subjects", "6", "--seed", "7", "--shape", "96", "96", "24",
                 "--sessions", "2"]) == 0  # fmt: skip
    assert main(["validate", str(root)]) == 0
    assert "subjects      6 (12 scans)" in capsys.readouterr().out

    sets = ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"data.root={root}"]
    assert main(["grid", "--config", str(CI), *sets, "--no-progress"]) == 0
    run = tmp_path / "runs" / "ci"
    lesions = pd.read_parquet(run / "prepared" / "lesions.parquet")
    assert sorted(set(lesions["subject"])) == SCANS
    features = pd.read_parquet(run / "features" / "features.parquet")
    assert sorted(set(features["subject"])) == SCANS and len(features) == len(lesions)
    assert sorted(p.stem for p in (run / "features" / "subjects").glob("*.parquet")) == SCANS

    splits = json.loads((run / "splits.json").read_text())
    fold_of: dict[str, int] = {}
    for k, fold in enumerate(splits):
        assert not {_subject(s) for s in fold["train"]} & {_subject(s) for s in fold["test"]}
        for scan in fold["test"]:
            assert fold_of.setdefault(_subject(scan), k) == k, f"sub-{_subject(scan)} in folds {fold_of[_subject(scan)]} and {k}"
    assert sorted(s for f in splits for s in f["test"]) == SCANS

    assert main(["evaluate", str(run), "--no-figures"]) == 0
    oof = pd.read_parquet(run / "evaluation" / "oof.parquet")
    assert sorted(set(oof["subject"])) == SCANS
    for scan, fold in oof.groupby("subject")["fold"].first().items():
        assert fold_of[_subject(scan)] == fold

    model = tmp_path / "model.onnx"
    assert main(["export", str(run), "--out", str(model)]) == 0
    out = tmp_path / "predictions"
    capsys.readouterr()
    assert main(["predict", str(root), "--model", str(model), "--out", str(out), "--providers", "cpu"]) == 0
    printed = capsys.readouterr().out
    for scan in SCANS:
        sub, ses = scan.split("_")
        assert f"sub-{scan}:" in printed
        table = out / f"sub-{sub}" / ses / "anat" / f"sub-{scan}_desc-rim_lesions.tsv"
        assert len(pd.read_csv(table, sep="\t")) == int((lesions["subject"] == scan).sum()), table
    scans = pd.read_csv(out / "scans.tsv", sep="\t")
    assert scans["scan"].tolist() == [f"sub-{s}" for s in SCANS]
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    assert participants["participant_id"].tolist() == [f"sub-00{s}" for s in range(1, 7)]
    assert participants["n_scans"].tolist() == [2] * 6
