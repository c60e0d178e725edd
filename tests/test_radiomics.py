"""Radiomics core: feature names, settings, the fast path's equality with plain pyradiomics, the standardiser."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import radiomics
from scipy import ndimage

from qsmrim.data import discover_cohort, load_subject
from qsmrim.radiomics import (
    FEATURE_NAMES,
    FEATURE_TABLE_COLUMNS,
    RadiomicsSettings,
    RadiomicsStandardiser,
    SubjectError,
    _fastnp,
    extract_lesion_features,
    extract_subject,
    extract_volumes,
)
from qsmrim.radiomics.reference import default_extractor, reference_lesion_features

SPACING = (0.75, 0.75, 3.0)
REL_TOL = 1e-9


@pytest.fixture(scope="module", autouse=True)
def _quiet_pyradiomics():
    """Keep pyradiomics' stderr handler to errors (the reference logs a SumAverage warning per call)."""
    level = radiomics.handler.level
    radiomics.setVerbosity(40)
    yield
    radiomics.handler.setLevel(level)


@pytest.fixture(scope="module")
def extractor():
    return default_extractor()


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference over entries finite in both (0 where both are exactly equal)."""
    both = np.isfinite(a) & np.isfinite(b)
    diff = np.abs(a[both] - b[both])
    scale = np.maximum(np.abs(a[both]), np.abs(b[both]))
    rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    return float(rel.max(initial=0.0))


def _assert_equal_to_reference(fast: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert fast.shape == ref.shape == (527,)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(ref), err_msg=f"{what}: inf pattern differs")
    assert _rel_diff(fast, ref) <= REL_TOL, f"{what}: relative difference {_rel_diff(fast, ref):.3g}"


# -- feature names ---------------------------------------------------------------------------------------------


def test_feature_names_count_order_and_pins():
    """Check that there are 527 unique names in the documented order."""
    assert len(FEATURE_NAMES) == len(set(FEATURE_NAMES)) == 527
    assert FEATURE_NAMES[:2] == ("original_shape_Elongation", "original_shape_Flatness")
    assert FEATURE_NAMES[14] == "original_firstorder_10Percentile"
    assert FEATURE_NAMES[-1] == "wavelet-LLL_glrlm_ShortRunLowGrayLevelEmphasis"
    assert not any("SumAverage" in n for n in FEATURE_NAMES)
    prefixes = [n.split("_")[0] for n in FEATURE_NAMES[14:]]
    assert list(dict.fromkeys(prefixes)) == ["original"] + [
        f"wavelet-{b}" for b in ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")
    ]
    assert sum(n.startswith("original_shape_") for n in FEATURE_NAMES) == 14
    for cls, count in (("firstorder", 18), ("glcm", 23), ("glrlm", 16)):
        assert sum(f"_{cls}_" in n for n in FEATURE_NAMES) == 9 * count


def test_feature_names_follow_pyradiomics_default_output_order(extractor, synth_root):
    """Check that FEATURE_NAMES is the order of a default pyradiomics result, minus diagnostics and SumAverage."""
    vol = load_subject(discover_cohort(synth_root).subjects[0])
    index = max(vol.lesion_indices, key=lambda i: int((vol.instances == i).sum()))
    from qsmrim.radiomics.reference import to_sitk

    result = extractor.execute(
        to_sitk(vol.qsm * 1000.0, SPACING), to_sitk((vol.instances == index).astype(np.uint8), SPACING)
    )
    keys = [k for k in result if not k.startswith("diagnostics_")]
    assert len(keys) == 536
    assert tuple(k for k in keys if not k.endswith("_glcm_SumAverage")) == FEATURE_NAMES


# -- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err_type, err_msg",
    [
        ({"bin_width": 0}, ValueError, "bin_width must be a finite number > 0"),
        ({"bin_width": "25"}, TypeError, "bin_width must be a number"),
        ({"qsm_scale": -1.0}, ValueError, "qsm_scale must be a finite number > 0"),
        ({"wavelet": "morlet"}, ValueError, "wavelet must be a discrete PyWavelets wavelet"),
        ({"wavelet": 3}, TypeError, "wavelet must be a string"),
        ({"crop_margin": 1}, ValueError, "crop_margin must be >= half"),
        ({"crop_margin": 2.5}, TypeError, "crop_margin must be an int"),
        ({"minimum_roi_dimensions": 4}, ValueError, "minimum_roi_dimensions must be 1, 2 or 3"),
    ],
)
def test_settings_invalid(kwargs, err_type, err_msg):
    """Check that each bad setting raises with a message naming it."""
    with pytest.raises(err_type, match=err_msg):
        RadiomicsSettings(**kwargs)


def test_settings_digest_tracks_values_not_margin():
    """Check that the cache digest changes with a feature-changing setting but not with the crop margin."""
    base = RadiomicsSettings()
    assert base.digest == RadiomicsSettings(crop_margin=12).digest
    assert base.digest != RadiomicsSettings(bin_width=20).digest
    assert base.pyradiomics_kwargs()["binWidth"] == 25.0 and base.margin == 6


# -- equality with a plain, default, uncropped pyradiomics call -----------------------------------------------


def test_fast_path_equals_default_pyradiomics_on_synthetic_cohort(synth_root, extractor):
    """Check that the fast path equals a default pyradiomics call (rel. diff <= 1e-9, same NaN) on every lesion
    of the test cohort."""
    compared, sizes, total = 0, [], 0
    for files in discover_cohort(synth_root).subjects:
        vol = load_subject(files)
        total += len(vol.lesion_indices)
        table = extract_volumes(vol)
        for _, row in table.iterrows():
            mask = vol.instances == row["lesion"]
            ref = reference_lesion_features(vol.qsm, mask, vol.spacing, extractor=extractor)
            fast = row[list(FEATURE_NAMES)].to_numpy(dtype=float)
            _assert_equal_to_reference(fast, ref, f"subject {files.subject} lesion {row['lesion']}")
            assert (row["status"] == "nan") == bool(np.isnan(ref).all())
            compared += 1
            sizes.append(int(mask.sum()))
    assert compared == total >= 40
    assert min(sizes) <= 3 and max(sizes) >= 100, sizes
    assert sum(s > 3 for s in sizes) >= 20


def _smooth_noise(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (
        0.08 * ndimage.gaussian_filter(rng.standard_normal(shape), (2, 2, 0.7)) + rng.normal(0, 0.01, shape)
    ).astype(np.float32)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


EDGE_CASES = {
    # odd-sized axes and lesions at every border: the wavelet window wraps exactly as pyradiomics' padding
    "x=0 border": lambda s: _ellipsoid(s, (0, 15, 7), (3, 4, 1.5)),
    "x=max border (odd axis)": lambda s: _ellipsoid(s, (s[0] - 1, 12, 6), (3, 3, 1.5)),
    "z borders": lambda s: (
        _ellipsoid(s, (16, 15, 0), (4, 3, 1)) | _ellipsoid(s, (16, 15, s[2] - 1), (4, 3, 1))
    ),
    "corner": lambda s: _ellipsoid(s, (s[0] - 2, s[1] - 2, s[2] - 2), (3, 3, 1.5)),
    "large": lambda s: _ellipsoid(s, (16, 15, 7), (9, 10, 3)),
    "two-voxel line": lambda s: _voxels(s, [(5, 5, 5), (6, 5, 5)]),
    "three voxels in one slice": lambda s: _voxels(s, [(9, 9, 4), (10, 9, 4), (10, 10, 4)]),
    "single voxel": lambda s: _voxels(s, [(20, 20, 8)]),
    "single-slice disc": lambda s: _ellipsoid(s, (20, 12, 8), (3, 3, 0.4)),
}


def _voxels(shape, coords) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for c in coords:
        mask[c] = True
    return mask


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_fast_path_equals_default_pyradiomics_edge_cases(case, extractor):
    """Check equality with pyradiomics for border, odd-axis, tiny and flat-slice lesions."""
    shape = (33, 31, 15)
    qsm = _smooth_noise(shape, seed=len(case))
    mask = EDGE_CASES[case](shape)
    assert mask.any()
    fast = extract_lesion_features(qsm, mask, SPACING)
    ref = reference_lesion_features(qsm, mask, SPACING, extractor=extractor)
    _assert_equal_to_reference(fast.values, ref, case)


@pytest.mark.parametrize("radii, scale", [((12, 12, 5), 0.5), ((22, 24, 9), 5.0)],
                         ids=["~3k voxels", "~20k voxels, 5 ppm (haemorrhage-like)"])
def test_large_lesions_give_finite_features(radii, scale):
    """Check every one of the 527 features is finite for large, strongly varying lesions (the cohort's
    lesions stop at a few hundred voxels; confluent ones reach thousands)."""
    shape = (72, 72, 32)
    qsm = _smooth_noise(shape, seed=7) * (scale / 0.08)
    mask = _ellipsoid(shape, (36, 36, 16), radii)
    fast = extract_lesion_features(qsm, mask, SPACING)
    bad = [n for n, v in zip(FEATURE_NAMES, fast.values, strict=True) if not np.isfinite(v)]
    assert not bad, (int(mask.sum()), bad[:10])


def test_flat_intensity_lesion_equals_pyradiomics(extractor):
    """Check that a lesion of one constant intensity neither crashes nor differs from pyradiomics."""
    shape = (40, 40, 12)
    qsm = _smooth_noise(shape, seed=3)
    mask = _ellipsoid(shape, (20, 20, 6), (5, 6, 2))
    qsm[mask] = 0.05
    fast = extract_lesion_features(qsm, mask, SPACING)
    ref = reference_lesion_features(qsm, mask, SPACING, extractor=extractor)
    _assert_equal_to_reference(fast.values, ref, "flat lesion")
    assert fast.values[FEATURE_NAMES.index("original_firstorder_Range")] == 0.0


@pytest.mark.parametrize(
    "coords, reason",
    [
        ([(5, 5, 5)], "single-voxel lesion"),
        ([(5, 5, 5), (6, 5, 5)], "lesion spans 1 axis"),
        ([(5, 5, 5), (6, 5, 5), (7, 5, 5)], "lesion spans 1 axis"),
    ],
)
def test_tiny_lesions_give_nan_with_reason(coords, reason):
    """Check that 1-3 voxel lesions pyradiomics refuses give all-NaN values and a reason, not an exception."""
    shape = (16, 16, 10)
    result = extract_lesion_features(_smooth_noise(shape, 0), _voxels(shape, coords), SPACING)
    assert result.status == "nan" and reason in result.reason
    assert np.isnan(np.asarray(result)).all() and np.asarray(result).shape == (527,)


def test_extract_lesion_features_input_errors():
    """Check that a mask of another shape raises and an empty mask gives NaN with a reason."""
    qsm = _smooth_noise((16, 16, 10), 0)
    with pytest.raises(ValueError, match="lesion_mask shape"):
        extract_lesion_features(qsm, np.zeros((16, 16, 9), bool), SPACING)
    with pytest.raises(ValueError, match="3-D"):
        extract_lesion_features(qsm[0], np.zeros((16, 10), bool), SPACING)
    empty = extract_lesion_features(qsm, np.zeros(qsm.shape, bool), SPACING)
    assert empty.status == "nan" and "empty" in empty.reason
    mask = _ellipsoid(qsm.shape, (8, 8, 5), (3, 3, 1.5))
    qsm[8, 8, 5] = np.nan
    bad = extract_lesion_features(qsm, mask, SPACING)
    assert bad.status == "nan" and "non-finite QSM values inside the lesion" in bad.reason


def test_lesion_features_as_dict_and_float64():
    """Check that results are float64 in FEATURE_NAMES order."""
    shape = (24, 24, 10)
    result = extract_lesion_features(
        _smooth_noise(shape, 1), _ellipsoid(shape, (12, 12, 5), (4, 4, 2)), SPACING
    )
    assert result.status == "ok" and result.values.dtype == np.float64
    assert list(result.as_dict()) == list(FEATURE_NAMES)


# -- the lean numpy replacements -------------------------------------------------------------------------------


def _arrays(seed: int):
    rng = np.random.default_rng(seed)
    for shape in [(1, 13), (9, 57), (1, 1), (3, 700), (1, 5, 5, 13), (2, 4, 4, 1)]:
        a = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)
        yield a
        b = a.copy()
        b.flat[rng.integers(0, b.size, max(1, b.size // 5))] = np.nan
        yield b
        yield np.round(a)  # ties
        yield np.asfortranarray(a) if a.ndim > 1 else a
        yield a[:, ::-1] if a.ndim == 2 else a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_numpy_is_bit_identical(seed):
    """Check that every replaced numpy function returns numpy's exact bits (or defers to numpy)."""
    for a in _arrays(seed):
        for axis in [1, (1, 2), None] if a.ndim == 4 else [1, None]:
            for fn in ("nanmean", "nansum", "nanmin", "nanmax", "sum"):
                with np.errstate(all="ignore"), _no_warning_check():
                    np.testing.assert_array_equal(
                        getattr(_fastnp, fn)(a, axis), getattr(np, fn)(a, axis), err_msg=fn
                    )
            if a.ndim == 2:
                with _no_warning_check():
                    np.testing.assert_array_equal(
                        _fastnp.nanmean(a, 1, keepdims=True), np.nanmean(a, 1, keepdims=True)
                    )
                    for q in (10, 25, 75, 90):
                        np.testing.assert_array_equal(
                            _fastnp.nanpercentile(a, q, axis=1), np.nanpercentile(a, q, axis=1)
                        )
                    np.testing.assert_array_equal(_fastnp.nanmedian(a, 1), np.nanmedian(a, 1))


@contextlib.contextmanager
def _no_warning_check():
    """numpy warns on all-NaN slices; the comparisons here only care about values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_accelerated_classes_leave_pyradiomics_untouched():
    """Check that the lean clones do not change pyradiomics' own functions or module globals."""
    from radiomics.glcm import RadiomicsGLCM

    lean = _fastnp.accelerated(RadiomicsGLCM)
    assert issubclass(lean, RadiomicsGLCM)
    assert RadiomicsGLCM.getContrastFeatureValue.__globals__["numpy"] is np
    assert lean.getContrastFeatureValue.__globals__["numpy"] is _fastnp.lean_numpy()
    assert lean.getContrastFeatureValue.__code__ is RadiomicsGLCM.getContrastFeatureValue.__code__


def test_import_leaves_dask_ray_mlflow_out():
    """Check that importing qsmrim.radiomics (and touching its API) imports no Dask, Ray or MLflow."""
    code = (
        "import sys, qsmrim.radiomics as r; r.read_features; r.extract_subject; r.RadiomicsStandardiser; "
        "import qsmrim.radiomics.tasks, qsmrim.fanout.features, qsmrim.fanout.cli; "
        "print(sorted(m for m in ('dask', 'distributed', 'ray', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- per-subject table -------------------------------------------------------------------------------------------


def test_extract_subject_table(synth_root):
    """Check the per-subject table: columns, dtypes, lesions sorted, a subset on request."""
    files = discover_cohort(synth_root).subjects[0]
    table = extract_subject(files)
    vol = load_subject(files)
    assert tuple(table.columns) == FEATURE_TABLE_COLUMNS
    assert table["lesion"].tolist() == vol.lesion_indices
    assert (table["subject"] == files.subject).all()
    assert set(table["status"]) <= {"ok", "nan", "partial"}
    assert all(table[c].dtype == np.float64 for c in FEATURE_NAMES)
    some = vol.lesion_indices[1::3]
    part = extract_subject(files, list(reversed(some)))
    assert part["lesion"].tolist() == some
    pd.testing.assert_frame_equal(
        part.reset_index(drop=True), table[table["lesion"].isin(some)].reset_index(drop=True)
    )


def test_extract_subject_missing_lesion_names_subject_and_lesion(synth_root):
    """Check that a lesion index absent from the map raises an error naming subject and lesion."""
    files = discover_cohort(synth_root).subjects[0]
    with pytest.raises(SubjectError, match=rf"subject {files.subject}, lesion 999: lesion index not found"):
        extract_subject(files, [1, 999])


def test_extract_subject_grid_mismatch_names_subject_and_file(cohort_copy):
    """Check that a lesion map on another grid raises an error naming subject and file, writing nothing."""
    import nibabel as nib

    files = discover_cohort(cohort_copy).subjects[1]
    img = nib.load(files.lesions)
    data = np.asarray(img.dataobj)[:, :, :-1]
    nib.save(nib.Nifti1Image(data, img.affine), files.lesions)
    with pytest.raises(SubjectError) as info:
        extract_subject(files)
    text = str(info.value)
    assert f"subject {files.subject}" in text and files.lesions.name in text and "shape" in text


# -- standardiser --------------------------------------------------------------------------------------------------


def _feature_frame(n: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(size=(n, 527)) * rng.uniform(0.1, 1e4, 527)
    values[:3, 10] = np.nan
    values[:, 20] = 7.0
    return pd.DataFrame(values, columns=list(FEATURE_NAMES))


def test_standardiser_fit_transform():
    """Check median fill, zero mean / unit variance on the training fold and a constant feature mapped to 0."""
    X = _feature_frame()
    st = RadiomicsStandardiser().fit(X)
    z = st.transform(X)
    assert z.dtype == np.float32 and z.shape == (30, 527) and np.isfinite(z).all()
    assert st.median_[10] == pytest.approx(np.nanmedian(X.iloc[:, 10]))
    np.testing.assert_allclose(z[:, [0, 100, 526]].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 100, 526]].std(axis=0), 1, rtol=1e-4)
    assert st.scale_[20] == 1.0 and (z[:, 20] == 0).all()
    assert list(st.feature_names_in_) == list(FEATURE_NAMES)
    assert list(st.get_feature_names_out()) == list(FEATURE_NAMES)


def test_standardiser_reorders_dataframe_columns_and_fills_inf():
    """Check that a DataFrame's columns are matched by name and inf is treated as missing."""
    X = _feature_frame()
    st = RadiomicsStandardiser().fit(X)
    shuffled = X[list(reversed(X.columns))].assign(extra=1.0)
    np.testing.assert_array_equal(st.transform(shuffled), st.transform(X))
    X2 = X.copy()
    X2.iloc[0, 5] = np.inf
    assert st.transform(X2)[0, 5] == np.float32((st.median_[5] - st.mean_[5]) / st.scale_[5])


def test_standardiser_clip_and_export():
    """Check clipping and the float32 arrays exported for the ONNX graph."""
    X = _feature_frame()
    st = RadiomicsStandardiser(clip=1.5).fit(X)
    assert np.abs(st.transform(X)).max() <= 1.5
    params = st.export_params()
    assert set(params) == {"median", "mean", "scale"} and all(
        v.dtype == np.float32 and v.shape == (527,) for v in params.values()
    )


@pytest.mark.parametrize(
    "params, X, err_type, err_msg",
    [
        ({"clip": 0}, np.zeros((3, 527)), ValueError, "clip must be a number > 0 or None"),
        ({"clip": "big"}, np.zeros((3, 527)), ValueError, "clip must be a number > 0 or None"),
        ({}, np.zeros((0, 527)), ValueError, "at least 1 sample"),
        ({}, np.zeros(527), ValueError, "must be 2-D"),
        ({}, pd.DataFrame({"a": [1.0]}), ValueError, "none of the radiomic feature columns"),
    ],
)
def test_standardiser_fit_invalid(params, X, err_type, err_msg):
    """Check that bad parameters or data fail in fit with a clear message."""
    with pytest.raises(err_type, match=err_msg):
        RadiomicsStandardiser(**params).fit(X)


def test_standardiser_not_fitted_and_wrong_width():
    """Check the unfitted error and a feature-count mismatch."""
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted yet"):
        RadiomicsStandardiser().transform(np.zeros((2, 527)))
    st = RadiomicsStandardiser().fit(np.ones((4, 527)))
    with pytest.raises(ValueError, match="X has 10 features, but RadiomicsStandardiser is expecting 527"):
        st.transform(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="missing 1 feature column"):
        st.transform(_feature_frame().drop(columns=[FEATURE_NAMES[4]]))
