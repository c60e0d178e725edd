"""Per-lesion extraction of the 527 features: pyradiomics' own arithmetic, without its per-call overhead.

A default pyradiomics call filters the *whole* image with the wavelet, round-trips every band through
SimpleITK, re-discovers feature names with ``inspect`` and re-bins the same image once per class. For a
lesion of a few hundred voxels that is 0.6-0.7 s of overhead. This module instead

* crops each lesion's bounding box plus a margin of one wavelet filter length (per axis, or the whole
  axis where the margin would wrap around the image border, so the periodic boundary of the stationary
  wavelet transform is reproduced), and runs the same ``pywt.swtn`` call on that window only;
* hands numpy arrays straight to pyradiomics' feature classes (created without their SimpleITK
  ``__init__``), bins each image once for all three texture classes and calls the feature getters directly.

Every value still comes from pyradiomics' own code on bit-identical inputs; the equality test in
``tests/test_radiomics.py`` checks the result against a plain default pyradiomics call
(:func:`qsmrim.radiomics.reference.reference_lesion_features`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pywt
import radiomics
from radiomics import imageoperations
from radiomics.firstorder import RadiomicsFirstOrder
from radiomics.glcm import RadiomicsGLCM
from radiomics.glrlm import RadiomicsGLRLM
from radiomics.shape import RadiomicsShape

from qsmrim.radiomics._fastnp import accelerated
from qsmrim.radiomics.feature_names import (
    FEATURE_NAMES,
    IMAGE_TYPES,
    N_FEATURES,
    SHAPE_FEATURES,
    TEXTURE_CLASSES,
)
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, PYRADIOMICS_VERSION, RadiomicsSettings

__all__ = ["LesionFeatures", "extract_lesion_features", "LesionExtractor", "scale_qsm"]

log = logging.getLogger(__name__)

if PYRADIOMICS_VERSION not in str(getattr(radiomics, "__version__", "")):
    warnings.warn(
        f"qsmrim.radiomics was validated against pyradiomics {PYRADIOMICS_VERSION}, found "
        f"{getattr(radiomics, '__version__', '?')}; run tests/test_radiomics.py before trusting its values",
        RuntimeWarning,
        stacklevel=2,
    )

_CLASSES = {
    name: accelerated(cls)
    for name, cls in (("firstorder", RadiomicsFirstOrder), ("glcm", RadiomicsGLCM), ("glrlm", RadiomicsGLRLM))
}
_SHAPE = accelerated(RadiomicsShape)
_SWT_AXES = (2, 1, 0)  # pyradiomics' order on its (z, y, x) arrays
_N_SHAPE = len(SHAPE_FEATURES)
_BAND_KEYS = tuple(
    t.split("-")[1].replace("L", "a").replace("H", "d") for t in IMAGE_TYPES[1:]
)  # pywt's keys
_FO_PER_IMAGE = ("Entropy", "Uniformity")

MAX_GREY_LEVELS = 512
"""Most grey levels one image of one lesion may span before its texture features are left NaN.

GLCM/GLRLM matrices are sized by the grey levels squared: a QSM in ppb instead of ppm spans ~10^4 levels at a
25 ppb bin width and the matrices alone take gigabytes (the process was OOM-killed), and absurd values make
binning allocate without bound. 512 levels is a 12.8 ppm span inside one lesion, far beyond in-vivo QSM (the
synthetic cohort's lesions span well under 100); ``qsmrim.data.qc``'s ``qc_units`` flag names the cause."""


@dataclass(frozen=True)
class LesionFeatures:
    """The 527 values of one lesion (float64, :data:`FEATURE_NAMES` order) and why any are NaN.

    ``status`` is ``"ok"`` (all computed), ``"partial"`` (pyradiomics failed on some features, which are NaN)
    or ``"nan"`` (the lesion cannot be described, e.g. a single voxel; all NaN). ``reason`` says why.
    ``np.asarray(result)`` gives the values.
    """

    values: np.ndarray
    status: str = "ok"
    reason: str = ""

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def as_dict(self) -> dict[str, float]:
        """Feature name -> value."""
        return dict(zip(FEATURE_NAMES, self.values.tolist(), strict=True))


def scale_qsm(qsm: np.ndarray, settings: RadiomicsSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """QSM (ppm) as float64 in extraction units (ppb by default); both the fast and reference path use this."""
    return np.asarray(qsm, dtype=np.float64) * settings.qsm_scale


def extract_lesion_features(
    qsm: np.ndarray,
    lesion_mask: np.ndarray,
    spacing: Sequence[float],
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
) -> LesionFeatures:
    """The 527 features of one lesion, equal to a default pyradiomics call on the whole image.

    Args:
        qsm: QSM in ppm, indexed ``[x, y, z]`` (RAS+ voxel order, as :func:`qsmrim.data.load_subject` gives).
        lesion_mask: Boolean (or 0/1) array of the same shape; non-zero voxels are the lesion (the ROI).
        spacing: Voxel size in mm along x, y, z.
        settings: Extraction settings; the paper's by default.

    Returns:
        A :class:`LesionFeatures`; a lesion pyradiomics cannot describe (an empty mask, one voxel, a line)
        gives NaN with the reason instead of raising.

    Example:
        >>> import numpy as np
        >>> qsm = np.random.default_rng(0).normal(0, 0.05, (32, 32, 12)).astype(np.float32)
        >>> mask = np.zeros(qsm.shape, bool); mask[10:16, 12:18, 4:7] = True
        >>> extract_lesion_features(qsm, mask, (0.75, 0.75, 3.0)).values.shape
        (527,)
    """
    qsm = np.asarray(qsm)
    mask = np.asarray(lesion_mask)
    if qsm.ndim != 3:
        raise ValueError(f"qsm must be a 3-D array indexed [x, y, z], not {qsm.ndim}-D")
    if mask.shape != qsm.shape:
        raise ValueError(f"lesion_mask shape {mask.shape} differs from qsm shape {qsm.shape}")
    extractor = LesionExtractor.for_settings(settings)
    return extractor.extract(scale_qsm(qsm, settings), mask.astype(bool, copy=False), spacing)


class LesionExtractor:
    """Reusable fast path: holds everything that does not change between lesions (built once per process).

    Use :meth:`for_settings` to get the cached instance; :meth:`extract` works on an already scaled image,
    so a subject's QSM is scaled once for all its lesions.
    """

    def __init__(self, settings: RadiomicsSettings = DEFAULT_SETTINGS):
        self.settings = settings
        self.kwargs: dict[str, Any] = settings.pyradiomics_kwargs()
        self.wavelet = pywt.Wavelet(settings.wavelet)
        self.margin = settings.margin
        self._shape_getters = _getters(_SHAPE, SHAPE_FEATURES)
        self._per_image = sum(len(f) for _, f in TEXTURE_CLASSES)
        # per-image calls: Entropy and Uniformity (need each image's histogram), glcm and glrlm
        self._texture_getters: list[tuple[str, type, list[Callable[[Any], Any]], np.ndarray]] = []
        self._fo_batched: list[Callable[[Any], Any]] = []
        batched_cols: list[int] = []
        start = 0
        for name, feats in TEXTURE_CLASSES:
            per_image = [f for f in feats if name != "firstorder" or f in _FO_PER_IMAGE]
            cols = np.array([start + feats.index(f) for f in per_image])
            self._texture_getters.append((name, _CLASSES[name], _getters(_CLASSES[name], per_image), cols))
            if name == "firstorder":
                batched = [f for f in feats if f not in _FO_PER_IMAGE]
                self._fo_batched = _getters(_CLASSES[name], batched)
                batched_cols = [start + feats.index(f) for f in batched]
            start += len(feats)
        self._fo_batched_cols = np.array(batched_cols)

    @staticmethod
    @lru_cache(maxsize=8)
    def for_settings(settings: RadiomicsSettings) -> LesionExtractor:
        """The process-wide extractor for these settings (feature-class setup is paid once)."""
        return LesionExtractor(settings)

    # -- public ---------------------------------------------------------------------------------------------

    def extract(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        spacing: Sequence[float],
        bbox: tuple[slice, slice, slice] | None = None,
    ) -> LesionFeatures:
        """Features of the ROI ``mask`` on the scaled ``image`` (both ``[x, y, z]``).

        ``bbox`` (slices of the ROI's bounding box, e.g. from ``scipy.ndimage.find_objects``) skips a search
        of the whole mask; ``mask`` may then be given just for that box (its shape equal to the box's).
        """
        if bbox is None:
            bbox = _bounding_box(mask)
            if bbox is None:
                return _all_nan("nan", "empty lesion mask: no voxels")
            roi = mask[bbox]
        else:
            roi = mask if mask.shape == tuple(s.stop - s.start for s in bbox) else mask[bbox]
        extent = [s.stop - s.start for s in bbox]
        n_dims = sum(e > 1 for e in extent)
        if n_dims == 0:
            return _all_nan("nan", "single-voxel lesion: pyradiomics cannot describe one voxel")
        if n_dims < self.settings.minimum_roi_dimensions:
            return _all_nan(
                "nan",
                f"lesion spans {n_dims} axis (extent {'x'.join(map(str, extent))} voxels); pyradiomics needs "
                f"{self.settings.minimum_roi_dimensions}",
            )
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._extract(image, np.ascontiguousarray(roi.transpose(2, 1, 0)), bbox, spacing)

    # -- internals ------------------------------------------------------------------------------------------

    def _extract(
        self,
        image: np.ndarray,
        roi_zyx: np.ndarray,
        bbox: tuple[slice, slice, slice],
        spacing: Sequence[float],
    ) -> LesionFeatures:
        values = np.full(N_FEATURES, np.nan)
        failures: list[str] = []
        window, inner = self._window(image, bbox)
        inner_zyx = inner[::-1]
        spacing_xyz = tuple(float(s) for s in spacing)
        if not np.isfinite(window).all():
            # pyradiomics would bin NaN into a real grey level and return plausible-looking numbers
            where = (
                "inside the lesion"
                if not np.isfinite(window[inner_zyx][roi_zyx]).all()
                else "near the lesion"
            )
            return _all_nan(
                "nan", f"non-finite QSM values {where} (within the {self.margin}-voxel wavelet margin)"
            )

        try:
            values[:_N_SHAPE] = self._shape(roi_zyx, spacing_xyz)
        except Exception as exc:  # noqa: BLE001 - pyradiomics may raise anything; record it, never crash
            failures.append(f"shape: {type(exc).__name__}: {exc}")

        images: list[np.ndarray] = [window[inner_zyx]]
        try:
            bands = pywt.swtn(window, self.wavelet, level=1, start_level=0, axes=_SWT_AXES)[0]
            images += [bands[key][inner_zyx] for key in _BAND_KEYS]
        except Exception as exc:  # noqa: BLE001 - record, never crash
            failures.append(f"wavelet: {type(exc).__name__}: {exc}")
        block = values[_N_SHAPE:].reshape(len(IMAGE_TYPES), self._per_image)  # a view: rows are image types
        failures += self._textures([np.ascontiguousarray(im) for im in images], roi_zyx, spacing_xyz, block)

        if failures:
            return LesionFeatures(values, "partial", "; ".join(failures))
        if np.isnan(values).any():
            bad = [FEATURE_NAMES[i] for i in np.flatnonzero(np.isnan(values))]
            return LesionFeatures(
                values, "partial", f"pyradiomics gave NaN for {len(bad)} feature(s): {bad[:5]}"
            )
        return LesionFeatures(values)

    def _window(
        self, image: np.ndarray, bbox: tuple[slice, slice, slice]
    ) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The wavelet window around ``bbox`` as a (z, y, x) array, and the bounding box's slices within it.

        pyradiomics pads an odd-length axis with one wrapped slice and filters periodically; a window that
        keeps ``margin`` voxels on both sides of the box sees exactly the same neighbourhood. Where that
        margin would leave the padded image, the whole padded axis is used instead.
        """
        index: list[np.ndarray | slice] = []
        inner: list[slice] = []
        for axis, s in enumerate(bbox):
            n = image.shape[axis]
            n_pad = n + n % 2
            lo, hi = s.start - self.margin, s.stop + self.margin  # half-open
            if (hi - lo) % 2:
                if hi < n_pad:
                    hi += 1
                else:
                    lo -= 1
            if lo < 0 or hi > n_pad:
                lo, hi = 0, n_pad
            if hi <= n:
                index.append(slice(lo, hi))
            else:  # the padded slice n is slice 0 again (numpy 'wrap' padding)
                index.append(np.r_[np.arange(lo, n), 0])
            inner.append(slice(s.start - lo, s.stop - lo))
        if all(isinstance(i, slice) for i in index):
            window = image[tuple(index)]
        else:
            window = image[
                np.ix_(*[np.arange(i.start, i.stop) if isinstance(i, slice) else i for i in index])
            ]
        return np.ascontiguousarray(window.transpose(2, 1, 0)), tuple(inner)

    def _shape(self, roi_zyx: np.ndarray, spacing_xyz: tuple[float, float, float]) -> np.ndarray:
        obj = _bare(_SHAPE, self.kwargs)
        obj.pixelSpacing = np.array(spacing_xyz[::-1])
        obj.maskArray = np.pad(roi_zyx, 1)
        # the rest of RadiomicsShape._initSegmentBasedCalculation, verbatim apart from the SimpleITK padding
        obj.labelledVoxelCoordinates = np.where(obj.maskArray != 0)
        obj.SurfaceArea, obj.Volume, obj.diameters = radiomics.cShape.calculate_coefficients(
            obj.maskArray, obj.pixelSpacing
        )
        n_vox = len(obj.labelledVoxelCoordinates[0])
        coordinates = np.array(obj.labelledVoxelCoordinates, dtype="int").transpose((1, 0))
        physical = coordinates * obj.pixelSpacing[None, :]
        physical -= np.mean(physical, axis=0)
        physical /= np.sqrt(n_vox)
        covariance = np.dot(physical.T.copy(), physical)
        obj.eigenValues = np.linalg.eigvals(covariance)
        machine_errors = np.bitwise_and(obj.eigenValues < 0, obj.eigenValues > -1e-10)
        if np.sum(machine_errors) > 0:
            obj.eigenValues[machine_errors] = 0
        obj.eigenValues.sort()
        return _call(obj, self._shape_getters)

    def _textures(
        self,
        images: list[np.ndarray],
        roi_zyx: np.ndarray,
        spacing_xyz: tuple[float, float, float],
        out: np.ndarray,
    ) -> list[str]:
        """Fill ``out[k]`` with the texture features of ``images[k]``; return what failed.

        First-order features of all images are computed in one call per feature: pyradiomics' getters work
        row-wise on a (n_images, n_voxels) array exactly as on one row (its voxel-based mode relies on
        that). Only Entropy and Uniformity depend on each image's own histogram and are called per image.
        """
        failures: list[str] = []
        binned: list[np.ndarray | None] = []
        for k, image in enumerate(images):
            with np.errstate(all="ignore"):
                levels = float(np.ptp(image[roi_zyx])) / float(self.kwargs["binWidth"])
            if not levels <= MAX_GREY_LEVELS:  # also NaN: checked before binning allocates anything
                binned.append(None)
                failures.append(f"{IMAGE_TYPES[k]}: spans {levels:.3g} grey levels (> {MAX_GREY_LEVELS}; is the "
                                "QSM in ppm?): texture features left NaN")  # fmt: skip
                continue
            try:
                binned.append(imageoperations.binImage(image, roi_zyx, **self.kwargs)[0])
            except Exception as exc:  # noqa: BLE001
                binned.append(None)
                failures.append(f"{IMAGE_TYPES[k]} binning: {type(exc).__name__}: {exc}")
        try:
            out[: len(images), self._fo_batched_cols] = self._firstorder_batched(images, roi_zyx, spacing_xyz)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"firstorder: {type(exc).__name__}: {exc}")
        for k, image in enumerate(images):
            if binned[k] is None:
                continue
            grey_levels = np.unique(binned[k][roi_zyx])
            coefficients = {"grayLevels": grey_levels, "Ng": int(np.max(grey_levels))}
            for name, cls, getters, cols in self._texture_getters:
                try:
                    obj = _bare(cls, self.kwargs)
                    obj.maskArray = roi_zyx
                    obj.coefficients = dict(coefficients)
                    if name == "firstorder":
                        obj.imageArray = image
                        obj.pixelSpacing = spacing_xyz
                        obj.voxelArrayShift = 0
                        obj.discretizedImageArray = binned[k]
                    else:
                        obj.imageArray = binned[k]
                        obj.weightingNorm = None
                        if name == "glcm":
                            obj.symmetricalGLCM = True
                            obj.P_glcm = None
                        else:
                            obj.P_glrlm = None
                    obj._initCalculation()
                    out[k, cols] = _call(obj, getters)
                except Exception as exc:  # noqa: BLE001
                    failures.append(f"{IMAGE_TYPES[k]} {name}: {type(exc).__name__}: {exc}")
        return failures

    def _firstorder_batched(
        self, images: list[np.ndarray], roi_zyx: np.ndarray, spacing_xyz: tuple[float, float, float]
    ) -> np.ndarray:
        obj = _bare(_CLASSES["firstorder"], self.kwargs)
        obj.pixelSpacing = spacing_xyz
        obj.voxelArrayShift = 0
        # what RadiomicsFirstOrder._initCalculation builds per image, stacked: one row per image
        obj.targetVoxelArray = np.stack([image[roi_zyx].astype("float") for image in images])
        result = np.empty((len(images), len(self._fo_batched)))
        for j, get in enumerate(self._fo_batched):
            try:
                result[:, j] = get(obj)
            except Exception:  # noqa: BLE001 - as pyradiomics: NaN for a failing feature
                result[:, j] = np.nan
        return result


# -- module-private helpers -----------------------------------------------------------------------------------


def _getters(cls: type, features: Sequence[str]) -> list[Callable[[Any], Any]]:
    return [getattr(cls, f"get{f}FeatureValue") for f in features]


def _bare(cls: type, kwargs: dict[str, Any]) -> Any:
    """A feature-class instance with the attributes its ``__init__`` would set, minus SimpleITK and inspect."""
    obj = cls.__new__(cls)
    obj.logger = logging.getLogger(cls.__module__)
    obj.settings = kwargs
    obj.label = 1
    obj.voxelBased = False
    obj.coefficients = {}
    obj.enabledFeatures = {}
    obj.featureValues = {}
    return obj


def _call(obj: Any, getters: list[Callable[[Any], Any]]) -> np.ndarray:
    """Call each getter as pyradiomics' ``_calculateSegment`` does: squeeze the result, NaN on an exception."""
    out = np.empty(len(getters))
    for i, get in enumerate(getters):
        try:
            out[i] = np.squeeze(get(obj))
        except Exception:  # noqa: BLE001 - pyradiomics stores NaN for a failing feature, so do we
            out[i] = np.nan
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    slices = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)  # type: ignore[return-value]


def _all_nan(status: str, reason: str) -> LesionFeatures:
    return LesionFeatures(np.full(N_FEATURES, np.nan), status, reason)
