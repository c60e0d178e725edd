"""BIDS entities: sessions, acq/rec/run, any lesion derivative folder and desc, and every ambiguity refused.

Trees are named as real BIDS datasets name them (``sub-01/ses-02/anat/sub-01_ses-02_acq-gre_Chimap.nii.gz``,
lesion maps under ``derivatives/<pipeline>/``); volumes are tiny hand-made images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qsmrim.cli import main
from qsmrim.data import (
    InputError,
    LesionSource,
    discover_cohort,
    participant_of,
    scan_folder,
    session_of,
    validate_cohort,
    write_nifti,
)
from qsmrim.data.bids import entities_of, scan_id

SHAPE = (20, 20, 8)
AFFINE = np.diag([0.75, 0.75, 3.0, 1.0])


def _lesions() -> np.ndarray:
    """Two lesions: a 3x3x2 block (1) and a 2x2x2 block (2)."""
    inst = np.zeros(SHAPE, np.int16)
    inst[4:7, 4:7, 2:4] = 1
    inst[12:14, 12:14, 4:6] = 2
    return inst


def _image(root: Path, folder: str, name: str, kind: str = "qsm", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(0.05, 0.01, SHAPE).astype(np.float32) if kind == "qsm" else rng.uniform(1, 2, SHAPE).astype(np.float32)
    return write_nifti(root / folder / name, data, AFFINE)


def _scan(root: Path, prefix: str, *, ses: bool = True, flair: str | None = None, pipeline: str = "lesions",
          desc: str = "lesions", mask: bool = False, labels: tuple[int, int] = (1, 0)) -> None:  # fmt: skip
    """Write one complete scan ``prefix`` (e.g. ``sub-01_ses-02_run-1``): QSM, FLAIR, lesion map and labels."""
    ent = dict(p.split("-", 1) for p in prefix.split("_"))
    folder = f"sub-{ent['sub']}" + (f"/ses-{ent['ses']}" if ses and "ses" in ent else "") + "/anat"
    _image(root, folder, f"{prefix}_Chimap.nii.gz")
    _image(root, folder, f"{flair or prefix}_FLAIR.nii.gz", "flair")
    der = root / "derivatives" / pipeline / folder
    inst = _lesions()
    if mask:
        write_nifti(der / f"{prefix}_desc-{desc}_mask.nii.gz", (inst > 0).astype(np.uint8), AFFINE)
    else:
        write_nifti(der / f"{prefix}_desc-{desc}_dseg.nii.gz", inst, AFFINE)
    (der / f"{prefix}_desc-{desc}_dseg.tsv").write_text(f"index\trim\n1\t{labels[0]}\n2\t{labels[1]}\n")


def test_scan_id_round_trips_entities():
    """Check that scan ids are the entity string after sub- and parse back, subject-only ids unchanged."""
    ent = {"sub": "01", "ses": "02", "acq": "gre", "rec": "mag", "run": "1"}
    assert scan_id(ent) == "01_ses-02_acq-gre_rec-mag_run-1"
    assert entities_of("01_ses-02_acq-gre_rec-mag_run-1") == ent
    assert scan_id({"sub": "001"}) == "001"
    assert (participant_of("01_ses-02"), session_of("01_ses-02"), session_of("01")) == ("01", "02", None)
    assert scan_folder("01_ses-02_run-1") == Path("sub-01/ses-02/anat")
    assert scan_folder("01") == Path("sub-01/anat")


def test_sessions_and_subject_only_scans_are_units_of_work(tmp_path):
    """Check that sub-X/ses-Y/anat scans and a subject-only scan are found, validated and tabled per scan."""
    _scan(tmp_path, "sub-01_ses-01")
    _scan(tmp_path, "sub-01_ses-02", labels=(0, 0))
    _scan(tmp_path, "sub-02")
    cohort = discover_cohort(tmp_path)
    assert [s.subject for s in cohort.subjects] == ["01_ses-01", "01_ses-02", "02"]
    assert [(s.participant, s.session) for s in cohort.subjects] == [("01", "01"), ("01", "02"), ("02", None)]
    assert cohort.subjects[1].qsm == tmp_path / "sub-01/ses-02/anat/sub-01_ses-02_Chimap.nii.gz"
    report = validate_cohort(tmp_path)
    assert report.ok, report.problems
    assert report.summary()["subjects"] == 2 and report.summary()["scans"] == 3
    rim = report.table.set_index(["subject", "lesion"])["rim"]
    assert rim.to_dict() == {("01_ses-01", 1): 1, ("01_ses-01", 2): 0, ("01_ses-02", 1): 0, ("01_ses-02", 2): 0,
                             ("02", 1): 1, ("02", 2): 0}  # fmt: skip


def test_acq_rec_run_entities_make_separate_scans(tmp_path):
    """Check that two complete runs (with acq- and rec-) are two scans whose ids keep every entity."""
    _scan(tmp_path, "sub-01_ses-01_acq-gre_rec-mag_run-1")
    _scan(tmp_path, "sub-01_ses-01_acq-gre_rec-mag_run-2")
    ids = [s.subject for s in discover_cohort(tmp_path).subjects]
    assert ids == ["01_ses-01_acq-gre_rec-mag_run-1", "01_ses-01_acq-gre_rec-mag_run-2"]


def test_flair_without_the_qsm_acq_pairs_when_it_is_the_sessions_only_one(tmp_path):
    """Check that a session's only QSM (acq-gre) and only FLAIR (no acq-) pair, the scan named after the QSM,
    and that the lesion map may carry the FLAIR's entities (tools that segment the FLAIR name it so)."""
    _image(tmp_path, "sub-01/ses-01/anat", "sub-01_ses-01_acq-gre_Chimap.nii.gz")
    _image(tmp_path, "sub-01/ses-01/anat", "sub-01_ses-01_FLAIR.nii.gz", "flair")
    der = tmp_path / "derivatives/lesions/sub-01/ses-01/anat"
    write_nifti(der / "sub-01_ses-01_desc-lesions_dseg.nii.gz", _lesions(), AFFINE)
    (s,) = discover_cohort(tmp_path).subjects
    assert s.subject == "01_ses-01_acq-gre"
    assert s.flair.name == "sub-01_ses-01_FLAIR.nii.gz" and s.labels is None
    assert validate_cohort(tmp_path).ok


def _two_runs_one_flair(root: Path) -> None:
    _image(root, "sub-01/ses-01/anat", "sub-01_ses-01_run-1_Chimap.nii.gz")
    _image(root, "sub-01/ses-01/anat", "sub-01_ses-01_run-2_Chimap.nii.gz")
    _image(root, "sub-01/ses-01/anat", "sub-01_ses-01_FLAIR.nii.gz", "flair")


def _flair_without_qsm(root: Path) -> None:
    _scan(root, "sub-01_ses-01")
    _image(root, "sub-01/ses-02/anat", "sub-01_ses-02_FLAIR.nii.gz", "flair")


def _flair_run_without_qsm_run(root: Path) -> None:
    _scan(root, "sub-01_run-1", ses=False)
    _image(root, "sub-01/anat", "sub-01_run-2_FLAIR.nii.gz", "flair")


def _nii_beside_niigz(root: Path) -> None:
    _scan(root, "sub-01")
    _image(root, "sub-01/anat", "sub-01_Chimap.nii")


def _wrong_session_folder(root: Path) -> None:
    _scan(root, "sub-01_ses-01")
    _image(root, "sub-01/ses-02/anat", "sub-01_ses-01_Chimap.nii.gz")


def _unsupported_entity(root: Path) -> None:
    _image(root, "sub-01/anat", "sub-01_echo-1_Chimap.nii.gz")


def _dseg_and_mask(root: Path) -> None:
    _scan(root, "sub-01")
    write_nifti(root / "derivatives/lesions/sub-01/anat/sub-01_desc-lesions_mask.nii.gz",
                (_lesions() > 0).astype(np.uint8), AFFINE)  # fmt: skip


def _missing_lesions_of_one_session(root: Path) -> None:
    _scan(root, "sub-01_ses-01")
    _image(root, "sub-01/ses-02/anat", "sub-01_ses-02_Chimap.nii.gz")
    _image(root, "sub-01/ses-02/anat", "sub-01_ses-02_FLAIR.nii.gz", "flair")


AMBIGUOUS = [
    (_two_runs_one_flair, "sub-01_ses-01_run-1_Chimap.nii.gz: no FLAIR with the same entities, and 1 other FLAIR(s) "
                          "(sub-01_ses-01_FLAIR.nii.gz) leave a choice; name the FLAIR sub-01_ses-01_run-1_FLAIR.nii.gz"),
    (_flair_without_qsm, "sub-01_ses-02_FLAIR.nii.gz: FLAIR without a QSM of the same entities "
                         "(sub-01_ses-02_Chimap.nii.gz): missing QSM (Chimap) image"),
    (_flair_run_without_qsm_run, "sub-01_run-2_FLAIR.nii.gz: FLAIR without a QSM of the same entities"),
    (_nii_beside_niigz, "sub-01_Chimap.nii, sub-01_Chimap.nii.gz are the same image twice; keep one"),
    (_wrong_session_folder, "sub-01_ses-01_Chimap.nii.gz: file has ses-01 but sits in ses-02/"),
    (_unsupported_entity, "sub-01_echo-1_Chimap.nii.gz: entity 'echo-' is not supported"),
    (_dseg_and_mask, "both a lesion dseg and a lesion mask for sub-01; keep one"),
    (_missing_lesions_of_one_session, "derivatives/lesions/sub-01/ses-02/anat/sub-01_ses-02_desc-lesions_dseg.nii.gz: "
                                      "missing lesion map (dseg or mask)"),
]  # fmt: skip


@pytest.mark.parametrize("build, message", AMBIGUOUS, ids=[a[0].__name__.strip("_") for a in AMBIGUOUS])
def test_ambiguous_or_incomplete_trees_are_refused_naming_the_file(tmp_path, capsys, build, message):
    """Check that each tree that leaves a choice or lacks a file is refused with one message naming the file."""
    build(tmp_path)
    with pytest.raises(InputError) as exc:
        discover_cohort(tmp_path)
    assert any(message in str(p) for p in exc.value.problems), exc.value.problems
    assert main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lesions_from_another_pipeline_with_binary_masks(tmp_path, capsys):
    """Check --lesions-from/--lesions-desc: binary masks of another pipeline give 26-connected instances."""
    _scan(tmp_path, "sub-01_ses-01", pipeline="lstai", desc="lstai", mask=True)
    mask_path = tmp_path / "derivatives/lstai/sub-01/ses-01/anat/sub-01_ses-01_desc-lstai_mask.nii.gz"
    m = (_lesions() > 0).astype(np.uint8)
    m[7, 7, 4] = 1  # touches lesion 1 (voxel 6,6,3) only at a corner: one 26-connected lesion, not two
    write_nifti(mask_path, m, AFFINE)
    with pytest.raises(InputError, match="desc-lesions_dseg.nii.gz: missing lesion map"):
        discover_cohort(tmp_path)
    source = LesionSource("derivatives/lstai", "lstai")
    report = validate_cohort(tmp_path, lesions=source)
    assert report.ok, report.problems
    assert report.table["n_voxels"].tolist() == [19, 8]
    assert main(["validate", str(tmp_path), "--lesions-from", "derivatives/lstai", "--lesions-desc", "lstai"]) == 0
    absolute = str(tmp_path / "derivatives" / "lstai")
    assert main(["validate", str(tmp_path), "--lesions-from", absolute, "--lesions-desc", "lstai", "--json"]) == 0
    assert '"lesions": 2' in capsys.readouterr().out
    assert main(["validate", str(tmp_path), "--lesions-from", "derivatives/lstai", "--lesions-desc", "lst-ai"]) == 1
    assert "lesions_desc: desc label must be alphanumeric (BIDS), not 'lst-ai'" in capsys.readouterr().err


def test_manifest_session_column_gives_scan_ids(tmp_path):
    """Check that a CSV manifest with a session column names scans as a BIDS root would."""
    _scan(tmp_path, "sub-01_ses-01")
    _scan(tmp_path, "sub-01_ses-02")
    rows = ["subject,session,qsm,flair,lesions,labels"]
    for s in discover_cohort(tmp_path).subjects:
        rows.append(f"sub-{s.participant},ses-{s.session},{s.qsm},{s.flair},{s.lesions},{s.labels}")
    (tmp_path / "m.csv").write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(InputError, match=r"m.csv:4: duplicate subject '01' session '01'"):
        discover_cohort(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert [s.subject for s in discover_cohort(tmp_path / "m.csv").subjects] == ["01_ses-01", "01_ses-02"]


def test_config_commands_take_the_lesion_source(tmp_path):
    """Check that --lesions-from/--lesions-desc on a config command (grid) set data.lesions_from/desc, and that
    without them the config's own values stay."""
    from qsmrim.cli import build_parser
    from qsmrim.locations import config_from_args

    ci = str(Path(__file__).resolve().parents[1] / "platform" / "experiments" / "ci.yaml")
    base = ["grid", "--config", ci, "--data", str(tmp_path), "--base-dir", str(tmp_path)]
    cfg, _ = config_from_args(build_parser().parse_args([*base, "--lesions-from", "derivatives/lstai",
                                                         "--lesions-desc", "lstai"]))  # fmt: skip
    assert cfg.data.lesion_source() == LesionSource("derivatives/lstai", "lstai")
    cfg, _ = config_from_args(build_parser().parse_args([*base, "--set", "data.lesions_desc=samseg"]))
    assert cfg.data.lesion_source() == LesionSource("derivatives/lesions", "samseg")


def test_prepare_reads_the_configured_pipeline(tmp_path):
    """Check that an experiment's data stage reads lesion maps from data.lesions_from with data.lesions_desc."""
    from qsmrim.config import load_config
    from qsmrim.prepare import prepare_cohort

    root = tmp_path / "bids"
    for prefix in ("sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01"):
        _scan(root, prefix, pipeline="samseg", desc="samseg", mask=True)
    ci = Path(__file__).resolve().parents[1] / "platform" / "experiments" / "ci.yaml"
    cfg = load_config(ci, {"data.root": str(root), "data.lesions_from": "derivatives/samseg",
                           "data.lesions_desc": "samseg"})  # fmt: skip
    res = prepare_cohort(cfg, tmp_path / "prepared")
    import pandas as pd

    table = pd.read_parquet(res.outputs["lesions"])
    assert table[["subject", "lesion"]].values.tolist() == [[s, i] for s in ("01_ses-01", "01_ses-02", "02_ses-01")
                                                            for i in (1, 2)]  # fmt: skip
    assert res.summary["patches"]["shape"] == [6, 2, 16, 32, 32]


def test_features_command_takes_the_lesion_source(tmp_path, capsys):
    """Check `qsmrim features ROOT --lesions-from --lesions-desc`: one cache file per scan, named by scan id."""
    import pandas as pd

    root = tmp_path / "bids"
    _scan(root, "sub-01_ses-01", pipeline="lstai", desc="lstai")
    _scan(root, "sub-01_ses-02", pipeline="lstai", desc="lstai")
    out = tmp_path / "features"
    argv = ["features", str(root), "--out", str(out), "--scheduler", "sync", "--no-progress"]
    assert main(argv) == 1
    assert "desc-lesions_dseg.nii.gz: missing lesion map" in capsys.readouterr().err
    assert main([*argv, "--lesions-from", "derivatives/lstai", "--lesions-desc", "lstai"]) == 0
    table = pd.read_parquet(out / "features.parquet")
    assert table[["subject", "lesion"]].values.tolist() == [["01_ses-01", 1], ["01_ses-01", 2],
                                                            ["01_ses-02", 1], ["01_ses-02", 2]]  # fmt: skip
    assert sorted(p.name for p in (out / "subjects").iterdir()) == ["01_ses-01.parquet", "01_ses-02.parquet"]


def test_missing_lesion_map_names_the_maps_that_are_there(tmp_path):
    """Check that a scan without a matching lesion map is told which maps of that desc the folder holds."""
    _image(tmp_path, "sub-01/ses-01/anat", "sub-01_ses-01_Chimap.nii.gz")
    _image(tmp_path, "sub-01/ses-01/anat", "sub-01_ses-01_FLAIR.nii.gz", "flair")
    der = tmp_path / "derivatives/lesions/sub-01/ses-01/anat"
    write_nifti(der / "sub-01_ses-01_space-flair_desc-lesions_mask.nii.gz", (_lesions() > 0).astype(np.uint8), AFFINE)
    write_nifti(der / "sub-01_ses-01_run-2_desc-lesions_dseg.nii.gz", _lesions(), AFFINE)
    with pytest.raises(InputError) as exc:
        discover_cohort(tmp_path)
    (problem,) = exc.value.problems
    assert problem.where.endswith("sub-01_ses-01_desc-lesions_dseg.nii.gz")
    assert problem.what == ("missing lesion map (dseg or mask); the folder holds sub-01_ses-01_run-2_desc-lesions_dseg"
                            ".nii.gz, sub-01_ses-01_space-flair_desc-lesions_mask.nii.gz (entity 'space-' is not "
                            "supported; a scan is named by sub-, ses-, acq-, rec-, run-, desc-), not named for this scan")  # fmt: skip
