"""The synthetic cohort: deterministic bytes, paper-like prevalence, lesions of the stated sizes."""

from __future__ import annotations

import hashlib

import numpy as np

from qsmrim.data import SynthConfig, build_lesion_table, discover_cohort, synthesize_cohort
from qsmrim.data.synth import draw_lesion_counts


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_same_seed_same_bytes(synth_root, tmp_path):
    """Check that the same seed reproduces the session cohort byte for byte, and another seed differs."""
    again = synthesize_cohort(tmp_path / "a", 2, seed=0, shape=(96, 96, 24))
    ref = _digest(synth_root)
    for name, h in _digest(again).items():
        if name.startswith(("sub-001", "sub-002", "derivatives/lesions/sub-00")):
            assert ref[name] == h, name
    other = synthesize_cohort(tmp_path / "b", 1, seed=1, shape=(96, 96, 24))
    assert _digest(other)["sub-001/anat/sub-001_Chimap.nii.gz"] != ref["sub-001/anat/sub-001_Chimap.nii.gz"]


def test_synth_prevalence_and_count_skew():
    """Check that rim+ prevalence is 4-5% and per-subject counts are skewed like the paper's Fig. 3."""
    rng = np.random.default_rng(0)
    cfg = SynthConfig()
    counts = np.array([draw_lesion_counts(rng, cfg) for _ in range(20000)])
    prevalence = counts[:, 0].sum() / counts.sum()
    assert 0.040 <= prevalence <= 0.050
    pos = counts[:, 0]
    assert 0.50 <= np.mean(pos == 0) <= 0.60  # many subjects without rim+ lesions
    assert 0.01 <= np.mean(pos > 6) <= 0.05  # a few with more than 6
    assert np.median(pos[pos > 0]) == 2  # paper: median 2 among subjects with any


def test_synth_lesion_sizes_and_values(synth_root):
    """Check lesion sizes (1 voxel up to about 15x20x5), QSM range in ppm, and that rims are brighter."""
    cohort = discover_cohort(synth_root)
    table = build_lesion_table(cohort)
    ext = table[["bbox_x1", "bbox_y1", "bbox_z1"]].values - table[["bbox_x0", "bbox_y0", "bbox_z0"]].values
    assert table.n_voxels.min() <= 3
    assert ext.max(axis=0).tolist() <= [19, 24, 7]
    assert ext[:, 0].max() >= 8
    import nibabel as nib

    qsm = np.asarray(nib.load(cohort.subjects[0].qsm).dataobj)
    brain = qsm[qsm != 0]
    assert -0.15 < np.percentile(brain, 1) and np.percentile(brain, 99) < 0.25


def test_synth_rim_lesions_have_brighter_edges(synth_root):
    """Check that rim+ lesions' edge voxels are brighter on QSM than their cores, unlike rim- lesions."""
    from scipy import ndimage

    from qsmrim.data import load_subject

    contrast = {0: [], 1: []}
    for files in discover_cohort(synth_root).subjects:
        vol = load_subject(files)
        for idx, rim in vol.labels.items():
            m = vol.instances == idx
            core = ndimage.binary_erosion(m, structure=np.ones((3, 3, 1), bool))
            if core.sum() < 4:
                continue
            contrast[rim].append(vol.qsm[m & ~core].mean() - vol.qsm[core].mean())
    assert contrast[1], "the session cohort should hold rim+ lesions"
    assert np.mean(contrast[1]) > np.mean(contrast[0]) + 0.01


def test_synth_first_subject_gives_held_out_subjects(synth_root, tmp_path):
    """Check that first_subject=k reproduces subject k of the seed and so can hold subjects out."""
    out = synthesize_cohort(tmp_path / "held", 1, seed=0, shape=(96, 96, 24), first_subject=4)
    assert [p.name for p in out.glob("sub-*")] == ["sub-004"]
    ref, new = _digest(synth_root), _digest(out)
    assert new["sub-004/anat/sub-004_Chimap.nii.gz"] == ref["sub-004/anat/sub-004_Chimap.nii.gz"]


def _lesion_stats(cfg, subjects):
    """(rim, kind, mean QSM, edge - core QSM) of every lesion of the given subjects, with a core."""
    from scipy import ndimage

    from qsmrim.data.synth import synthesize_subject

    out = []
    for number in subjects:
        qsm, _flair, inst, truth = synthesize_subject(cfg, 0, number)
        for les in truth:
            m = inst == les.index
            core = ndimage.binary_erosion(m, structure=np.ones((3, 3, 1), bool))
            if core.sum() >= 4:
                out.append((les.rim, les.kind, float(qsm[m].mean()), float(qsm[m & ~core].mean() - qsm[core].mean())))
    return out


def test_synth_rims_are_geometry_not_first_order():
    """Check the cohort is hard in the right way (issue 14): rim- lesions made to look like rim+ ones in their
    QSM values (homogeneously or centrally hyperintense, or with a vein at the edge) are as bright on average as
    rim+ lesions, so the mean cannot separate them, while edge-minus-core contrast, the geometry, does."""
    from sklearn.metrics import roc_auc_score

    stats = _lesion_stats(SynthConfig(shape=(96, 96, 24), p_no_rim_subject=0.0), range(1, 13))
    kinds = {k for _, k, _, _ in stats}
    assert {"central", "hyper", "vein", "iso", "hypo"} <= kinds
    assert {"rim-complete", "rim-partial"} <= kinds
    pos = [s for s in stats if s[0] == 1]
    mimics = [s for s in stats if s[1] in ("central", "hyper")]
    assert len(pos) >= 15 and len(mimics) >= 15
    # The mean QSM of rim+ lesions does not stand out from the mimics' ...
    y = [1] * len(pos) + [0] * len(mimics)
    assert roc_auc_score(y, [s[2] for s in pos + mimics]) < 0.75
    # ... but where the susceptibility sits does: rims are at the edge, the central mimics' at the centre.
    assert roc_auc_score(y, [s[3] for s in pos + mimics]) > 0.9
    assert np.mean([s[3] for s in stats if s[1] == "central"]) < 0 < np.mean([s[3] for s in pos])


def test_synth_rim_neg_kinds_are_checked():
    """Check that rim- appearance probabilities must name known kinds and sum to 1."""
    import pytest

    with pytest.raises(ValueError, match="rim_neg_kinds"):
        SynthConfig(rim_neg_kinds=(("iso", 0.5), ("blob", 0.5)))
    with pytest.raises(ValueError, match="rim_neg_kinds"):
        SynthConfig(rim_neg_kinds=(("iso", 0.5), ("hyper", 0.4)))


def test_synth_sessions_repeat_the_subject_with_new_noise(synth_root, tmp_path, capsys):
    """Check that `qsmrim synth --sessions 2` writes sub-X/ses-Y/anat scans: session 1 is the subject-only
    scan byte for byte, session 2 has the same lesions and labels and a different QSM."""
    from qsmrim.cli import main

    out = tmp_path / "ses"
    assert main(["synth", str(out), "--subjects", "2", "--seed", "0", "--shape", "96", "96", "24", "--sessions", "2"]) == 0
    assert "2 session(s) each" in capsys.readouterr().out
    ref, got = _digest(synth_root), _digest(out)
    assert got["sub-001/ses-01/anat/sub-001_ses-01_Chimap.nii.gz"] == ref["sub-001/anat/sub-001_Chimap.nii.gz"]
    assert got["sub-001/ses-02/anat/sub-001_ses-02_Chimap.nii.gz"] != ref["sub-001/anat/sub-001_Chimap.nii.gz"]
    dseg = "derivatives/lesions/sub-002/{}anat/sub-002_{}desc-lesions_dseg.{}"
    for ext in ("nii.gz", "tsv"):
        assert got[dseg.format("ses-02/", "ses-02_", ext)] == ref[dseg.format("", "", ext)]
    assert (out / "sub-001" / "sub-001_sessions.tsv").read_text() == "session_id\nses-01\nses-02\n"
    scans = [s.subject for s in discover_cohort(out).subjects]
    assert scans == ["001_ses-01", "001_ses-02", "002_ses-01", "002_ses-02"]
