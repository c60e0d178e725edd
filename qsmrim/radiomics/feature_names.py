"""The 527 radiomic feature names in the one fixed order that every table, model and ONNX graph uses.

Order (DESIGN §4): the 14 ``original_shape_*`` features first, then for each image type in
:data:`IMAGE_TYPES` (``original``, then the 8 coif1 wavelet decompositions in the order pyradiomics emits
them) the ``firstorder`` (18), ``glcm`` (23) and ``glrlm`` (16) features. Within a class, names are in the
order pyradiomics enumerates them (sorted by getter method name, so ``MeanAbsoluteDeviation`` precedes
``Mean``). This is the order of a default pyradiomics result with
``glcm_SumAverage`` dropped (it equals 2 x ``glcm_JointAverage`` for a symmetric GLCM). A test pins it.
"""

from __future__ import annotations

__all__ = [
    "FEATURE_NAMES",
    "IMAGE_TYPES",
    "WAVELET_BANDS",
    "SHAPE_FEATURES",
    "FIRSTORDER_FEATURES",
    "GLCM_FEATURES",
    "GLRLM_FEATURES",
    "TEXTURE_CLASSES",
    "N_FEATURES",
]

SHAPE_FEATURES: tuple[str, ...] = (
    "Elongation", "Flatness", "LeastAxisLength", "MajorAxisLength", "Maximum2DDiameterColumn",
    "Maximum2DDiameterRow", "Maximum2DDiameterSlice", "Maximum3DDiameter", "MeshVolume", "MinorAxisLength",
    "Sphericity", "SurfaceArea", "SurfaceVolumeRatio", "VoxelVolume",
)  # fmt: skip
FIRSTORDER_FEATURES: tuple[str, ...] = (
    "10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis", "Maximum",
    "MeanAbsoluteDeviation", "Mean", "Median", "Minimum", "Range", "RobustMeanAbsoluteDeviation",
    "RootMeanSquared", "Skewness", "TotalEnergy", "Uniformity", "Variance",
)  # fmt: skip
GLCM_FEATURES: tuple[str, ...] = (
    "Autocorrelation", "ClusterProminence", "ClusterShade", "ClusterTendency", "Contrast", "Correlation",
    "DifferenceAverage", "DifferenceEntropy", "DifferenceVariance", "Id", "Idm", "Idmn", "Idn", "Imc1", "Imc2",
    "InverseVariance", "JointAverage", "JointEnergy", "JointEntropy", "MCC", "MaximumProbability",
    "SumEntropy", "SumSquares",
)  # fmt: skip
"""The 24 default GLCM features less ``SumAverage``."""
GLRLM_FEATURES: tuple[str, ...] = (
    "GrayLevelNonUniformity", "GrayLevelNonUniformityNormalized", "GrayLevelVariance",
    "HighGrayLevelRunEmphasis", "LongRunEmphasis", "LongRunHighGrayLevelEmphasis",
    "LongRunLowGrayLevelEmphasis", "LowGrayLevelRunEmphasis", "RunEntropy", "RunLengthNonUniformity",
    "RunLengthNonUniformityNormalized", "RunPercentage", "RunVariance", "ShortRunEmphasis",
    "ShortRunHighGrayLevelEmphasis", "ShortRunLowGrayLevelEmphasis",
)  # fmt: skip

TEXTURE_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("firstorder", FIRSTORDER_FEATURES),
    ("glcm", GLCM_FEATURES),
    ("glrlm", GLRLM_FEATURES),
)
"""Grey-level feature classes computed on every image type, in output order."""

WAVELET_BANDS: tuple[str, ...] = ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")
"""Decompositions in pyradiomics' order; letters are the (x, y, z) filters, L low-pass, H high-pass."""

IMAGE_TYPES: tuple[str, ...] = ("original",) + tuple(f"wavelet-{b}" for b in WAVELET_BANDS)


def _build() -> tuple[str, ...]:
    names = [f"original_shape_{f}" for f in SHAPE_FEATURES]
    for image_type in IMAGE_TYPES:
        for cls, feats in TEXTURE_CLASSES:
            names += [f"{image_type}_{cls}_{f}" for f in feats]
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _build()
"""All 527 names, e.g. ``original_firstorder_Mean`` or ``wavelet-LLH_glcm_Contrast``."""

N_FEATURES: int = len(FEATURE_NAMES)

assert N_FEATURES == 527, N_FEATURES  # noqa: S101 - an import-time invariant of this module, not user input
