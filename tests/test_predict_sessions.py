"""``qsmrim predict`` on a session-structured cohort: outputs keep the BIDS entities, scans.tsv and participants.tsv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_serving_model import build_tiny_ensemble

from conftest import SMALL_SHAPE
from qsmrim.cli import main
from qsmrim.data import discover_cohort, synthesize_cohort
from serving.predict import predict_dataset
from serving.preprocess import prepare_files


@pytest.fixture(scope="module")
def sessions_root(tmp_path_factory) -> Path:
    """Two subjects, two sessions each; session 1 is byte-identical to the subject-only synth_root's subject."""
    return synthesize_cohort(tmp_path_factory.mktemp("ses") / "cohort", 2, seed=0, shape=SMALL_SHAPE, sessions=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, sessions_root) -> Path:
    prepared = prepare_files(discover_cohort(sessions_root).subjects[0])[1]
    return build_tiny_ensemble(tmp_path_factory.mktemp("model") / "model.onnx", prepared.patch, prepared.radiomics)


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype={"session_id": str})


def test_predict_keeps_entities_and_writes_scan_and_participant_tables(sessions_root, synth_root, model, tmp_path):
    """Check that each scan's outputs sit in sub-X/ses-Y/anat named sub-X_ses-Y_..., that session 1 predicts
    exactly as the same subject without sessions, and that participants.tsv takes the largest count per subject."""
    out = tmp_path / "deriv"
    result = predict_dataset(model, sessions_root, out, providers="cpu")
    assert result.ok, result.problems
    assert [r.subject for r in result.subjects] == ["001_ses-01", "001_ses-02", "002_ses-01", "002_ses-02"]
    for scan in ("sub-001_ses-01", "sub-002_ses-02"):
        sub, ses = scan.split("_")
        anat = out / sub / ses / "anat"
        for name in ("desc-rim_lesions.tsv", "label-rim_probseg.nii.gz", "desc-rimpos_dseg.nii.gz",
                     "desc-rimpos_mask.nii.gz", "desc-rimpos_dseg.tsv"):  # fmt: skip
            assert (anat / f"{scan}_{name}").is_file(), anat / f"{scan}_{name}"
    assert not (out / "sub-001" / "anat").exists()

    reference = tmp_path / "subject-only"
    assert predict_dataset(model, synth_root / "sub-001", reference, providers="cpu").ok
    assert (out / "sub-001/ses-01/anat/sub-001_ses-01_desc-rim_lesions.tsv").read_text() == (
        reference / "sub-001/anat/sub-001_desc-rim_lesions.tsv"
    ).read_text()
    assert not (reference / "scans.tsv").exists()  # a subject-only folder is written as before

    scans = _tsv(out / "scans.tsv")
    assert scans["scan"].tolist() == ["sub-001_ses-01", "sub-001_ses-02", "sub-002_ses-01", "sub-002_ses-02"]
    assert scans["session_id"].tolist() == ["ses-01", "ses-02", "ses-01", "ses-02"]
    for row in scans.itertuples():
        lesions = _tsv(out / row.lesions_tsv)
        assert (row.n_lesions, row.n_rim_predicted) == (len(lesions), int(lesions["rim"].sum()))
    participants = _tsv(out / "participants.tsv").set_index("participant_id")
    assert participants.index.tolist() == ["sub-001", "sub-002"]
    assert participants["n_scans"].tolist() == [2, 2]
    expected = scans.groupby("participant_id")[["n_lesions", "n_rim_predicted", "n_rim_expert"]].max()
    pd.testing.assert_frame_equal(participants[expected.columns].astype("int64"), expected.astype("int64"),
                                  check_names=False)  # fmt: skip


def test_predict_one_session_folder_merges_into_the_tables(sessions_root, model, tmp_path, capsys):
    """Check that `qsmrim predict ROOT/sub-X/ses-Y` predicts that scan only, and a second session merges in."""
    out = tmp_path / "deriv"
    args = ["predict", "--model", str(model), "--out", str(out), "--providers", "cpu"]
    assert main([*args, str(sessions_root / "sub-002" / "ses-02")]) == 0
    assert "sub-002_ses-02:" in capsys.readouterr().out
    assert _tsv(out / "scans.tsv")["scan"].tolist() == ["sub-002_ses-02"]
    assert main([*args, str(sessions_root / "sub-002" / "ses-01")]) == 0
    assert _tsv(out / "scans.tsv")["scan"].tolist() == ["sub-002_ses-01", "sub-002_ses-02"]
    assert _tsv(out / "participants.tsv")["n_scans"].tolist() == [2]
    assert main([*args, str(sessions_root / "sub-002" / "ses-07")]) == 1
    assert "ses-07: no such file or directory" in capsys.readouterr().err
