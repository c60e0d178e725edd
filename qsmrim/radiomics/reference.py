"""The plain, default, uncropped pyradiomics call that the fast path must reproduce (tests and benchmark).

Slow on purpose (0.6-0.7 s a lesion on a 160 x 160 x 40 image): it is the yardstick, not the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from radiomics import featureextractor

from qsmrim.radiomics.extract import scale_qsm
from qsmrim.radiomics.feature_names import FEATURE_NAMES, N_FEATURES
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, RadiomicsSettings

__all__ = ["default_extractor", "reference_lesion_features", "to_sitk"]

log = logging.getLogger(__name__)


def default_extractor(
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
) -> featureextractor.RadiomicsFeatureExtractor:
    """A ``RadiomicsFeatureExtractor`` with pyradiomics defaults, Original + Wavelet, and our four classes."""
    kwargs = settings.pyradiomics_kwargs()
    extractor = featureextractor.RadiomicsFeatureExtractor(
        binWidth=kwargs["binWidth"],
        wavelet=kwargs["wavelet"],
        minimumROIDimensions=kwargs["minimumROIDimensions"],
    )
    extractor.disableAllFeatures()
    for cls in ("firstorder", "glcm", "glrlm", "shape"):
        extractor.enableFeatureClassByName(cls)
    extractor.enableImageTypes(Original={}, Wavelet={})
    return extractor


def to_sitk(array_xyz: np.ndarray, spacing: Sequence[float]) -> sitk.Image:
    """A SimpleITK image of an ``[x, y, z]`` array (SimpleITK's numpy view is ``[z, y, x]``)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def reference_lesion_features(
    qsm: np.ndarray,
    lesion_mask: np.ndarray,
    spacing: Sequence[float],
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    extractor: featureextractor.RadiomicsFeatureExtractor | None = None,
) -> np.ndarray:
    """The 527 values of one lesion from ``RadiomicsFeatureExtractor.execute`` on the whole image.

    An invalid ROI (pyradiomics raises ``ValueError``: one voxel, a line) gives all NaN.
    """
    extractor = extractor or default_extractor(settings)
    image = to_sitk(scale_qsm(qsm, settings), spacing)
    mask = to_sitk(np.asarray(lesion_mask).astype(np.uint8), spacing)
    try:
        result = extractor.execute(image, mask)
    except ValueError as exc:
        log.debug("pyradiomics refused the lesion: %s", exc)
        return np.full(N_FEATURES, np.nan)
    return np.array([float(result[name]) for name in FEATURE_NAMES])
