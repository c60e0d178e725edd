"""Patches (DESIGN §4) on a hand-built volume: centring, masking, border padding, RAS/LPS invariance."""

from __future__ import annotations

import numpy as np
import pytest

from qsmrim.data import (
    PatchSpec,
    build_lesion_table,
    build_patch_cache,
    discover_cohort,
    load_subject,
    write_nifti,
)
from qsmrim.data.cohort import SubjectFiles

SHAPE = (48, 40, 20)  # x, y, z


def _hand_volumes():
    """QSM holds a unique value per voxel so every patch voxel can be traced back to its source."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    qsm = (1 + x + 100 * y + 10000 * z).astype(np.float32) * 1e-4
    flair = np.full(SHAPE, 2.0, np.float32)
    flair[:4] = 6.0  # a brighter band: the brain median must still be 2.0
    inst = np.zeros(SHAPE, np.int16)
    inst[20:25, 18:21, 9:12] = 1  # centre of mass (22, 19, 10)
    inst[25:28, 18:21, 9:12] = 2  # touches lesion 1 along x
    inst[0:3, 5:8, 0:2] = 3  # at the image corner: patch needs padding
    return qsm, flair, inst


def _write(root, qsm, flair, inst, affine):
    paths = {k: root / f"{k}.nii.gz" for k in ("qsm", "flair", "lesions")}
    for k, arr in zip(paths, (qsm, flair, inst), strict=True):
        write_nifti(paths[k], arr, affine)
    return SubjectFiles("hand", paths["qsm"], paths["flair"], paths["lesions"])


@pytest.fixture
def hand_subject(tmp_path):
    affine = np.diag([0.75, 0.75, 3.0, 1.0])
    return load_subject(_write(tmp_path, *_hand_volumes(), affine)), _hand_volumes()


def test_patch_is_centred_on_rounded_centre_of_mass(hand_subject):
    """Check that the patch centre voxel (8, 16, 16) is the lesion's rounded centre of mass (z, y, x)."""
    vol, (qsm, _, _) = hand_subject
    from qsmrim.data import extract_patches

    p = extract_patches(vol, [1])[0]
    assert p.shape == (2, 16, 32, 32) and p.dtype == np.float32
    assert p[0, 8, 16, 16] == pytest.approx(qsm[22, 19, 10])
    # the lesion's voxels land exactly where a numpy slice puts them
    ref = qsm.transpose(2, 1, 0)[10 - 8 : 10 + 8, 19 - 16 : 19 + 16, 22 - 16 : 22 + 16]
    lesion = vol.instances.transpose(2, 1, 0)[2:18, 3:35, 6:38] == 1
    np.testing.assert_array_equal(p[0], np.where(lesion, ref, 0))


def test_patch_masks_neighbouring_lesion(hand_subject):
    """Check that voxels of a touching lesion and background are zero in the target's patch."""
    vol, _ = hand_subject
    from qsmrim.data import extract_patches

    p1, p2 = extract_patches(vol, [1, 2])
    # lesion 2 occupies x 25..27 -> patch x index 25-22+16 = 19..21
    assert np.all(p1[:, 1:4, 15:18, 19:22] == 0)
    assert np.count_nonzero(p1[0]) == 5 * 3 * 3
    assert np.count_nonzero(p2[0]) == 3 * 3 * 3


def test_flair_divided_by_brain_median(hand_subject):
    """Check that FLAIR is divided by its median over brain voxels (QSM != 0)."""
    vol, _ = hand_subject
    from qsmrim.data import extract_patches

    p = extract_patches(vol, [1])[0]
    np.testing.assert_allclose(p[1][p[0] != 0], 1.0)


def test_patch_zero_padded_at_border(hand_subject):
    """Check that a lesion at the image corner gives a patch padded with zeros outside the image."""
    vol, (qsm, _, _) = hand_subject
    from qsmrim.data import extract_patches

    p = extract_patches(vol, [3])[0]
    # centre of mass (1, 6, 0.5) -> rounded half-up (1, 6, 1); patch z starts at 1-8=-7, x at 1-16=-15
    assert np.all(p[:, :7] == 0) and np.all(p[:, :, :, :15] == 0)
    assert p[0, 8, 16, 16] == pytest.approx(qsm[1, 6, 1])
    assert np.count_nonzero(p[0]) == 3 * 3 * 2


def test_lps_copy_gives_same_patches(tmp_path):
    """Check that a subject stored LPS (x and y flipped, affine to match) yields the RAS original's patches."""
    qsm, flair, inst = _hand_volumes()
    ras_aff = np.diag([0.75, 0.75, 3.0, 1.0])
    lps_aff = ras_aff.copy()
    lps_aff[0, 0], lps_aff[1, 1] = -0.75, -0.75
    lps_aff[:3, 3] = [0.75 * (SHAPE[0] - 1), 0.75 * (SHAPE[1] - 1), 0]
    (tmp_path / "ras").mkdir()
    (tmp_path / "lps").mkdir()
    ras = load_subject(_write(tmp_path / "ras", qsm, flair, inst, ras_aff))
    flip = (slice(None, None, -1), slice(None, None, -1))
    lps = load_subject(_write(tmp_path / "lps", qsm[flip], flair[flip], inst[flip], lps_aff))
    from qsmrim.data import extract_patches

    np.testing.assert_array_equal(extract_patches(ras), extract_patches(lps))
    np.testing.assert_allclose(ras.affine, lps.affine)
    t_ras, t_lps = build_lesion_table([ras]), build_lesion_table([lps])
    np.testing.assert_allclose(t_ras.filter(like="centroid").values, t_lps.filter(like="centroid").values)


def test_patch_cache_is_reused_and_invalidated(synth_root, tmp_path):
    """Check that the cohort cache is built once, memory-mapped, and rebuilt when the spec changes."""
    cohort = discover_cohort(synth_root)
    table = build_lesion_table(cohort)
    arr = build_patch_cache(cohort, table, tmp_path)
    assert arr.shape == (len(table), 2, 16, 32, 32) and isinstance(arr, np.memmap)
    mtime = (tmp_path / "patches.npy").stat().st_mtime_ns
    again = build_patch_cache(cohort, table, tmp_path)
    assert (tmp_path / "patches.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(arr, again)
    smaller = build_patch_cache(cohort, table, tmp_path, PatchSpec((8, 16, 16)))
    assert smaller.shape[1:] == (2, 8, 16, 16)
    # row k of the cache is the patch of table row k
    k = len(table) - 1
    from qsmrim.data import extract_patches

    vol = load_subject(next(s for s in cohort.subjects if s.subject == table.subject.iloc[k]))
    np.testing.assert_array_equal(again[k], extract_patches(vol, [int(table.lesion.iloc[k])])[0])


def test_patches_cut_during_validation_equal_a_second_read(synth_root, tmp_path, monkeypatch):
    """Check patches cut while validation holds the volumes equal the two-pass build, and read no NIfTI again."""
    import qsmrim.data.patches as patches_mod
    from qsmrim.data import extract_patches, validate_cohort

    cohort = discover_cohort(synth_root)
    table = build_lesion_table(cohort)
    two_pass = np.asarray(build_patch_cache(cohort, table, tmp_path / "two", PatchSpec()))
    prebuilt = {}
    report = validate_cohort(synth_root, on_subject=lambda v: prebuilt.__setitem__(
        v.subject, (list(v.lesion_indices), extract_patches(v, None, PatchSpec()))))
    assert report.ok and set(prebuilt) == {s.subject for s in cohort.subjects}
    reads = []
    real = patches_mod.load_subject
    monkeypatch.setattr(patches_mod, "load_subject", lambda files, **kw: reads.append(files) or real(files, **kw))
    one_pass = np.asarray(build_patch_cache(cohort, table, tmp_path / "one", PatchSpec(), prebuilt=prebuilt))
    assert reads == [] and np.array_equal(one_pass, two_pass)


def test_prepare_cohort_reads_each_subject_once(tmp_path, monkeypatch):
    """Check the pipeline's preparation loads every subject once on a first run and not at all on a rerun."""
    import qsmrim.data.lesions as lesions_mod
    import qsmrim.data.patches as patches_mod
    from conftest import REPO
    from qsmrim.config import load_config
    from qsmrim.prepare import prepare_cohort

    cfg = load_config(REPO / "platform" / "experiments" / "ci.yaml", {"data.synth_subjects": 3})
    reads = []
    for mod in (lesions_mod, patches_mod):
        real = mod.load_subject
        monkeypatch.setattr(mod, "load_subject", lambda files, _real=real, **kw: reads.append(files.subject) or _real(files, **kw))
    res = prepare_cohort(cfg, tmp_path / "prep")
    assert sorted(reads) == ["001", "002", "003"]
    first = np.load(res.outputs["patches"])
    reads.clear()
    again = prepare_cohort(cfg, tmp_path / "prep")
    assert sorted(reads) == ["001", "002", "003"]  # validation still reads them; the patch cache is current
    assert np.array_equal(np.load(again.outputs["patches"]), first)
