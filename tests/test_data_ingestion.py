"""Ingestion: a synthesized cohort round-trips exactly; every bad input gets its own message and exit 1."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_SHAPE
from qsmrim.cli import main
from qsmrim.data import (
    InputError,
    SynthConfig,
    build_lesion_table,
    discover_cohort,
    load_subject,
    validate_cohort,
    write_nifti,
)
from qsmrim.data.synth import synthesize_subject


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _paths(root: Path, sid: str = "001") -> dict[str, Path]:
    der = root / "derivatives" / "lesions" / f"sub-{sid}" / "anat"
    anat = root / f"sub-{sid}" / "anat"
    return {
        "qsm": anat / f"sub-{sid}_Chimap.nii.gz",
        "flair": anat / f"sub-{sid}_FLAIR.nii.gz",
        "dseg": der / f"sub-{sid}_desc-lesions_dseg.nii.gz",
        "tsv": der / f"sub-{sid}_desc-lesions_dseg.tsv",
    }


def test_ingestion_matches_generator_truth(synth_root):
    """Check that the lesion table has exactly the generator's lesions, sizes and rim labels."""
    table = build_lesion_table(discover_cohort(synth_root))
    cfg = SynthConfig(shape=SMALL_SHAPE)
    for number, (sid, rows) in enumerate(table.groupby("subject"), start=1):
        assert sid == f"{number:03d}"
        _, _, _, truth = synthesize_subject(cfg, 0, number)
        assert rows["lesion"].tolist() == [t.index for t in truth]
        assert rows["rim"].astype(int).tolist() == [t.rim for t in truth]
        assert rows["n_voxels"].tolist() == [t.n_voxels for t in truth]
    assert np.allclose(table["volume_mm3"], table["n_voxels"] * 0.75 * 0.75 * 3.0)


def test_lesion_table_geometry_matches_numpy(synth_root):
    """Check centroids (voxel and mm) and bounding boxes against a direct numpy computation."""
    files = discover_cohort(synth_root).subjects[0]
    vol = load_subject(files)
    table = build_lesion_table([vol])
    for row in table.itertuples():
        idx = np.argwhere(vol.instances == row.lesion)
        com = idx.mean(axis=0)
        np.testing.assert_allclose([row.centroid_vox_x, row.centroid_vox_y, row.centroid_vox_z], com, atol=1e-6)
        mm = vol.affine @ np.r_[com, 1.0]
        np.testing.assert_allclose([row.centroid_mm_x, row.centroid_mm_y, row.centroid_mm_z], mm[:3], atol=1e-6)
        assert [row.bbox_x0, row.bbox_y0, row.bbox_z0] == idx.min(axis=0).tolist()
        assert [row.bbox_x1, row.bbox_y1, row.bbox_z1] == (idx.max(axis=0) + 1).tolist()


def test_validate_prints_summary(synth_root, capsys):
    """Check that `qsmrim validate` on a valid cohort prints subjects, lesions, rim+ share and voxel size."""
    assert main(["validate", str(synth_root)]) == 0
    out = capsys.readouterr().out
    table = build_lesion_table(discover_cohort(synth_root))
    assert f"subjects      {4}" in out
    assert f"lesions       {len(table)}" in out
    assert f"rim+          {int((table.rim == 1).sum())} of {len(table)}" in out
    assert "0.75x0.75x3 mm" in out


def test_lesions_command_writes_table(synth_root, tmp_path, capsys):
    """Check that `qsmrim lesions` writes the same table as the library call and refuses to overwrite."""
    out = tmp_path / "lesions.parquet"
    assert main(["lesions", str(synth_root), "--out", str(out)]) == 0
    written = pd.read_parquet(out)
    pd.testing.assert_frame_equal(written, build_lesion_table(discover_cohort(synth_root)), check_dtype=False)
    assert main(["lesions", str(synth_root), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


def test_binary_mask_uses_26_connected_components(tmp_path):
    """Check that a binary mask's instances are its 26-connected components (diagonal neighbours join)."""
    root = tmp_path / "ds"
    aff = np.diag([0.75, 0.75, 3.0, 1.0])
    qsm = np.full((12, 12, 6), 0.01, np.float32)
    mask = np.zeros((12, 12, 6), np.uint8)
    mask[2, 2, 2] = mask[3, 3, 3] = 1  # corner-touching: one lesion
    mask[8:10, 8:10, 1:3] = 1  # a second lesion
    anat, der = root / "sub-01" / "anat", root / "derivatives" / "lesions" / "sub-01" / "anat"
    write_nifti(anat / "sub-01_Chimap.nii.gz", qsm, aff)
    write_nifti(anat / "sub-01_FLAIR.nii.gz", qsm + 1, aff)
    write_nifti(der / "sub-01_desc-lesions_mask.nii.gz", mask, aff)
    (der / "sub-01_desc-lesions_dseg.tsv").write_text("index\trim\n1\t1\n2\tn/a\n")
    table = build_lesion_table(discover_cohort(root))
    assert table["n_voxels"].tolist() == [2, 8]
    assert table["rim"].iloc[0] == 1 and pd.isna(table["rim"].iloc[1])


def test_csv_manifest_gives_same_table_as_bids(synth_root, tmp_path):
    """Check that a CSV manifest over the same files yields the same lesion table as the BIDS root."""
    lines = ["subject,qsm,flair,lesions,labels"]
    for s in discover_cohort(synth_root).subjects:
        lines.append(f"{s.subject},{s.qsm},{s.flair},{s.lesions},{s.labels}")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("\n".join(lines) + "\n")
    pd.testing.assert_frame_equal(build_lesion_table(discover_cohort(manifest)), build_lesion_table(discover_cohort(synth_root)))


# --- bad input: each case corrupts a copy, then checks message, exit code 1 and that nothing is written ---


def _rm_flair(root):
    _paths(root)["flair"].unlink()


def _rm_mask(root):
    _paths(root)["dseg"].unlink()


def _truncate(root):
    p = _paths(root)["qsm"]
    p.write_bytes(p.read_bytes()[:2000])


def _garbage(root):
    _paths(root)["flair"].write_bytes(gzip.compress(b"not a nifti file at all" * 20))


def _shape_mismatch(root):
    p = _paths(root)["flair"]
    img = nib.load(p)
    write_nifti(p, np.asarray(img.dataobj)[:-2], img.affine)


def _affine_mismatch(root):
    p = _paths(root)["flair"]
    img = nib.load(p)
    aff = img.affine.copy()
    aff[0, 3] += 0.5
    write_nifti(p, np.asarray(img.dataobj), aff)


def _four_d(root):
    p = _paths(root)["qsm"]
    img = nib.load(p)
    data = np.asarray(img.dataobj)
    write_nifti(p, np.stack([data, data], axis=-1), img.affine)


def _nan_in_lesion(root):
    p, d = _paths(root)["qsm"], _paths(root)["dseg"]
    img = nib.load(p)
    data = np.asarray(img.dataobj).copy()
    lesion = np.asarray(nib.load(d).dataobj) == 1
    data[np.argwhere(lesion)[0][0], np.argwhere(lesion)[0][1], np.argwhere(lesion)[0][2]] = np.nan
    write_nifti(p, data, img.affine)


def _empty_lesions(root):
    d = _paths(root)["dseg"]
    img = nib.load(d)
    write_nifti(d, np.zeros(img.shape, np.int16), img.affine)


def _label_for_missing_lesion(root):
    t = _paths(root)["tsv"]
    t.write_text(t.read_text() + "999\t0\t\t0\t0\n")


def _lesion_without_label(root):
    t = _paths(root)["tsv"]
    lines = t.read_text().splitlines()
    t.write_text("\n".join(lines[:-1]) + "\n")


def _bad_rim_value(root):
    t = _paths(root)["tsv"]
    lines = t.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[1] = "2"
    t.write_text("\n".join([lines[0], "\t".join(cells), *lines[2:]]) + "\n")


def _duplicate_subject(root):
    lines = ["subject,qsm,flair,lesions,labels"]
    s = discover_cohort(root).subjects[0]
    lines += [f"{s.subject},{s.qsm},{s.flair},{s.lesions},{s.labels}"] * 2
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


BAD_INPUTS = [
    (_rm_flair, "", "sub-001_FLAIR.nii.gz: missing FLAIR image"),
    (_rm_mask, "", "sub-001_desc-lesions_dseg.nii.gz: missing lesion map"),
    (_truncate, "", "sub-001_Chimap.nii.gz: unreadable or truncated NIfTI"),
    (_garbage, "", "sub-001_FLAIR.nii.gz: unreadable or truncated NIfTI"),
    (_shape_mismatch, "", "sub-001_FLAIR.nii.gz: shape (94, 96, 24) differs from QSM shape (96, 96, 24)"),
    (_affine_mismatch, "", "sub-001_FLAIR.nii.gz: affine differs from the QSM affine by 0.5 mm"),
    (_four_d, "", "sub-001_Chimap.nii.gz: expected a 3-D image, got 4-D"),
    (_nan_in_lesion, "", "sub-001_Chimap.nii.gz: non-finite voxels inside lesion(s) [1]"),
    (_empty_lesions, "", "sub-001_desc-lesions_dseg.nii.gz: empty lesion map"),
    (_label_for_missing_lesion, "", "sub-001_desc-lesions_dseg.tsv: label(s) for lesion(s) not in the map: [999]"),
    (_lesion_without_label, "", "sub-001_desc-lesions_dseg.tsv: lesion(s) without a label: ["),
    (_bad_rim_value, "", "sub-001_desc-lesions_dseg.tsv:2: rim value '2' for lesion 1 not in {0, 1, n/a}"),
    (_duplicate_subject, "manifest.csv", "manifest.csv:3: duplicate subject '001'"),
]


@pytest.mark.parametrize("corrupt, target, message", BAD_INPUTS, ids=[c[0].__name__.strip("_") for c in BAD_INPUTS])
def test_bad_input_is_reported_clearly(cohort_copy, tmp_path, capsys, corrupt, target, message):
    """Check that each bad input gets one clear message naming the file, exit 1, and nothing written."""
    corrupt(cohort_copy)
    source = str(cohort_copy / target) if target else str(cohort_copy)
    before = _snapshot(cohort_copy)
    out = tmp_path / "out" / "lesions.parquet"
    assert main(["validate", source]) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert main(["lesions", source, "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()
    assert _snapshot(cohort_copy) == before


def test_validate_reports_every_problem_at_once(cohort_copy, capsys):
    """Check that problems in several subjects are all listed in one run."""
    _rm_flair(cohort_copy)
    t = _paths(cohort_copy, "002")["tsv"]
    t.write_text(t.read_text() + "999\t1\t\t0\t0\n")
    assert main(["validate", str(cohort_copy)]) == 1
    err = capsys.readouterr().err
    assert "sub-001_FLAIR.nii.gz: missing FLAIR image" in err
    assert "sub-002_desc-lesions_dseg.tsv: label(s) for lesion(s) not in the map: [999]" in err


def test_na_labels_are_kept_unlabelled(cohort_copy):
    """Check that `n/a` rim labels stay in the table as missing (for inference, not training)."""
    t = _paths(cohort_copy)["tsv"]
    lines = t.read_text().splitlines()
    cells = lines[1].split("\t")
    cells[1] = "n/a"
    t.write_text("\n".join([lines[0], "\t".join(cells), *lines[2:]]) + "\n")
    report = validate_cohort(str(cohort_copy))
    assert report.ok
    assert report.summary()["unlabelled"] == 1
    assert pd.isna(report.table.set_index(["subject", "lesion"]).loc[("001", 1), "rim"])


def test_missing_root_is_an_input_error(tmp_path):
    """Check that a missing root raises InputError naming the path."""
    with pytest.raises(InputError, match="no such file or directory"):
        discover_cohort(tmp_path / "nope")
    assert not os.path.exists(tmp_path / "nope")


def test_cohort_copy_is_independent(cohort_copy, synth_root):
    """Check that the writable copy does not alias the session cohort."""
    _rm_flair(cohort_copy)
    assert _paths(synth_root)["flair"].exists()
    shutil.rmtree(cohort_copy / "sub-002")
    assert (synth_root / "sub-002").exists()


def test_file_digest_is_remembered_only_inside_the_block(tmp_path):
    """Check the digest equals sha256 of the bytes; inside remembered_digests a file is hashed once, outside
    a rewrite is seen at once (even with the same size within the clock's tick)."""
    import hashlib
    import importlib

    fp = importlib.import_module("qsmrim.data.fingerprint")  # the package exports a function of that name

    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    assert fp.file_digest(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two")
    assert fp.file_digest(f) == hashlib.sha256(b"two").hexdigest()
    with fp.remembered_digests():
        fp.file_digest(f)
        assert list(fp._memo.values()) == [hashlib.sha256(b"two").hexdigest()]
    assert fp._memo is None
