"""QSM input QC (qsmrim.data.qc): each built volume trips its own flag and only it; the synthetic cohort trips none.

Also home of :func:`tripping_volumes`, the broken variants of a real synthetic subject that the serving tests
upload as NIfTI.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from qsmrim.data import InputError, SubjectVolumes, discover_cohort, load_subject
from qsmrim.data.qc import QC_CHECKS, QCConfig, enforce_qc, run_qc


def _interior_block(vol: SubjectVolumes, size: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """A block of brain voxels free of lesions (and one voxel away from any), searched from the centre out."""
    from scipy import ndimage

    free = (vol.qsm != 0) & ~ndimage.binary_dilation(vol.instances > 0, iterations=1)
    fits = ndimage.minimum_filter(free.astype(np.uint8), size=size, mode="constant") > 0
    cands = np.argwhere(fits)
    centre = np.array(vol.qsm.shape) / 2
    c = cands[np.argmin(((cands - centre) ** 2).sum(axis=1))]
    return tuple(slice(int(a) - s // 2, int(a) - s // 2 + s) for a, s in zip(c, size, strict=True))  # type: ignore[return-value]


def tripping_volumes(vol: SubjectVolumes) -> dict[str, SubjectVolumes]:
    """One broken variant of ``vol`` per QC check, each meant to trip that check only."""
    out: dict[str, SubjectVolumes] = {}
    out["qc_units"] = replace(vol, qsm=vol.qsm * np.float32(1000.0))  # ppb
    qsm = vol.qsm.copy()
    n_brain = int((vol.qsm != 0).sum())
    side = int(math.ceil((0.03 * n_brain / 4) ** 0.5))  # 3 % of the brain, 4 slices thick
    qsm[_interior_block(vol, (side, side, 4))] = 0.0
    out["qc_brain_holes"] = replace(vol, qsm=qsm)
    qsm = vol.qsm.copy()
    qsm[_interior_block(vol, (1, 1, 1))] = 50.0  # one absurd voxel, 50 ppm
    out["qc_range"] = replace(vol, qsm=qsm)
    out["qc_flair_contrast"] = replace(vol, flair=np.roll(vol.flair, (9, 7, 0), axis=(0, 1, 2)))
    inst = vol.instances.copy()
    block = _interior_block(vol, (1, 1, 1))
    x, y, z = (s.start for s in block)
    line = (slice(max(0, x - 18), x + 18), slice(y, y + 1), slice(z, z + 1))
    seg = (inst[line] == 0) & (vol.qsm[line] != 0)
    inst[line] = np.where(seg, inst.max() + 1, inst[line])  # a 36-voxel streak: wider than the 32-voxel patch
    flair = vol.flair.copy()
    flair[line] = np.where(seg, 2.0 * np.median(vol.flair[vol.qsm != 0]), flair[line])
    out["qc_cropped"] = replace(vol, instances=inst, flair=flair)
    inst = vol.instances.copy()
    for idx in vol.lesion_indices:  # split every lesion in two along x: every half touches its twin
        xs = np.argwhere(inst == idx)[:, 0]
        cut = (inst == idx) & (np.arange(inst.shape[0])[:, None, None] > np.median(xs))
        inst[cut] = idx + 10_000
    out["qc_confluent"] = replace(vol, instances=inst)
    return out


@pytest.fixture(scope="module")
def subject(synth_root) -> SubjectVolumes:
    return load_subject(discover_cohort(synth_root).subjects[0])


def test_synthetic_cohort_trips_no_flag(synth_root):
    """Check that every subject of the clean synthetic cohort passes every check, with margin to each limit."""
    cfg = QCConfig()
    for files in discover_cohort(synth_root).subjects:
        report = run_qc(load_subject(files), cfg)
        assert report.flags == [], (files.subject, [str(p) for p in report.problems("x")])
        assert [c.name for c in report.checks] == list(QC_CHECKS)
        assert 0.1 < report["qc_units"].value < cfg.max_span_ppm / 5
        assert report["qc_units"].detail["guess"] == "ppm"
        assert report["qc_brain_holes"].value == 0.0
        assert report["qc_range"].value < cfg.max_extreme_ratio / 10
        assert report["qc_flair_contrast"].value > 1.5 * cfg.min_flair_ratio
        assert report["qc_cropped"].value == 0


@pytest.mark.parametrize("check", QC_CHECKS)
def test_each_built_volume_trips_its_flag_only(subject, check):
    """Check that the volume broken for ``check`` trips that flag and no other, and the message names it."""
    broken = tripping_volumes(subject)[check]
    report = run_qc(broken)
    assert report.flags == [check], [str(p) for p in report.problems("sub-001")]
    (problem,) = report.problems("sub-001")
    assert problem.what.startswith(f"{check} = ")
    assert report.as_dict()[check]["flag"] is True


def test_measured_values_against_hand_references(subject):
    """Check the values against direct NumPy computations on the same arrays."""
    vol = subject
    report = run_qc(vol)
    brain = vol.qsm[vol.qsm != 0].astype(np.float64)
    p1, p50, p99 = np.percentile(brain, (1, 50, 99))
    assert report["qc_units"].value == pytest.approx(p99 - p1)
    extreme = max(brain.max() - p50, p50 - brain.min()) / (p99 - p1)
    assert report["qc_range"].value == pytest.approx(extreme)
    med = np.median(vol.flair[vol.qsm != 0])
    ratios = [vol.flair[vol.instances == i].mean() / med for i in vol.lesion_indices]
    assert report["qc_flair_contrast"].value == pytest.approx(np.mean(ratios), rel=1e-5)
    # confluent: a brute-force dilation per lesion
    from scipy import ndimage

    touching = []
    for i in vol.lesion_indices:
        m = vol.instances == i
        ring = ndimage.binary_dilation(m, np.ones((3, 3, 3), bool)) & ~m
        if np.any((vol.instances[ring] > 0) & (vol.instances[ring] != i)):
            touching.append(i)
    assert list(report.confluent_lesions) == touching
    assert report["qc_confluent"].value == pytest.approx(len(touching) / len(vol.lesion_indices))
    # cropped: exactly the lesions whose patch (extract_patches itself) holds fewer voxels than the lesion
    from qsmrim.data import extract_patches

    for v in (vol, tripping_volumes(vol)["qc_cropped"]):
        patches = extract_patches(v)
        seen = (patches[:, 1] != 0).sum(axis=(1, 2, 3))  # FLAIR is positive on every lesion voxel
        sizes = np.array([(v.instances == i).sum() for i in v.lesion_indices])
        expected = [i for i, a, b in zip(v.lesion_indices, seen, sizes, strict=True) if a < b]
        assert list(run_qc(v).cropped_lesions) == expected
    assert expected  # the streak is cropped
    # holes: exactly the zeroed block, over the brain including it
    holes = tripping_volumes(vol)["qc_brain_holes"]
    zeroed = int(((vol.qsm != 0) & (holes.qsm == 0)).sum())
    check = run_qc(holes)["qc_brain_holes"]
    assert check.detail == {"voxels": zeroed, "brain_voxels": int((vol.qsm != 0).sum())}


@pytest.mark.parametrize(
    "scale, guess",
    [(1000.0, "ppb"), (128.0, "Hz"), (1e-6, "SI units")],
)
def test_unit_guess(subject, scale, guess):
    """Check that a ppm map scaled to another unit is flagged with a guess naming that unit."""
    report = run_qc(replace(subject, qsm=subject.qsm * np.float32(scale)))
    assert report.flags == ["qc_units"]
    assert guess in report["qc_units"].detail["guess"]


def test_phase_images_are_recognised(subject):
    """Check that a wrapped phase in radians and an integer raw phase are named as such."""
    rng = np.random.default_rng(0)
    brain = subject.qsm != 0
    rad = np.where(brain, rng.uniform(-np.pi, np.pi, subject.qsm.shape), 0).astype(np.float32)
    raw = np.where(brain, rng.integers(-4096, 4096, subject.qsm.shape), 0).astype(np.float32)
    raw[brain & (raw == 0)] = 1
    assert "radians" in run_qc(replace(subject, qsm=rad))["qc_units"].detail["guess"]
    assert "raw phase" in run_qc(replace(subject, qsm=raw))["qc_units"].detail["guess"]


def test_strict_policy_refuses_naming_check_value_and_setting(subject):
    """Check that strict refuses a flagged subject naming the check, its value and the setting; warn passes."""
    report = run_qc(tripping_volumes(subject)["qc_units"])
    enforce_qc(report, "warn", "sub-001")
    with pytest.raises(InputError, match=r"sub-001: qc_units = 1\d\d\.?\d* \(limit .*refused by --qc strict"):
        enforce_qc(report, "strict", "sub-001")
    enforce_qc(run_qc(subject), "strict", "sub-001")  # clean: nothing to refuse


def test_empty_qsm_is_reported_not_raised(subject):
    """Check that an all-zero QSM is a qc_units flag, not an exception."""
    report = run_qc(replace(subject, qsm=np.zeros_like(subject.qsm)))
    assert report.flags == ["qc_units"]
    assert report.as_dict()["qc_units"]["value"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"percentiles": (99.0, 1.0)}, "percentiles"),
        ({"min_span_ppm": 2.0}, "min_span_ppm"),
        ({"patch_size": (16, 32)}, "patch_size"),
    ],
)
def test_bad_config(kwargs, match):
    """Check that an impossible QC configuration is refused at construction, naming the field."""
    with pytest.raises(ValueError, match=match):
        QCConfig(**kwargs)


def test_bad_policy(subject):
    """Check that an unknown policy is refused with the allowed values."""
    with pytest.raises(ValueError, match=r"\['warn', 'strict'\]"):
        enforce_qc(run_qc(subject), "lenient", "sub-001")  # type: ignore[arg-type]


def test_qsm_in_ppb_leaves_texture_nan_instead_of_exhausting_memory(subject):
    """Check a QSM in ppb (a qc_units case) gets first-order features and NaN textures naming the grey-level
    span, instead of GLCM matrices of ~10^4 levels squared (the process was OOM-killed before)."""
    from qsmrim.radiomics import FEATURE_NAMES, extract_volumes
    from qsmrim.radiomics.extract import MAX_GREY_LEVELS

    idx = subject.lesion_indices[:2]
    ppm = extract_volumes(subject, idx)
    ppb = extract_volumes(replace(subject, qsm=subject.qsm * np.float32(1000.0)), idx)
    assert (ppm["status"] == "ok").all()  # in ppm nothing is near the cap
    assert (ppb["status"] == "partial").all()
    assert ppb["reason"].str.contains(f"grey levels \\(> {MAX_GREY_LEVELS}", regex=True).all()
    glcm = [n for n in FEATURE_NAMES if n.startswith("original_glcm")]
    assert ppb[glcm].isna().all().all() and ppm[glcm].notna().all().all()
    first = [n for n in FEATURE_NAMES if n.startswith("original_firstorder_Mean")]
    np.testing.assert_allclose(ppb[first].to_numpy(), ppm[first].to_numpy() * 1000, rtol=1e-4)
