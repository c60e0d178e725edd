r"""The radiomics standardisation's arithmetic, in plain NumPy: the one place its formula is written.

:math:`z_{ij} = (\tilde x_{ij} - \mu_j) / \sigma_j`, with :math:`\tilde x_{ij} = x_{ij}` if finite, else the
training median of feature :math:`j` (0 for a feature missing throughout); :math:`\mu_j` and :math:`\sigma_j`
(ddof=0) are taken after that fill, and :math:`\sigma_j = 1` where it is 0 or not finite.

:class:`qsmrim.radiomics.RadiomicsStandardiser` (scikit-learn API) and
:class:`qsmrim.training.Standardisation` (a member's fitted statistics, saved in ``member.json``) both call
these two functions; the exported ONNX graph repeats :func:`standardise` in float64 torch ops
(:mod:`qsmrim.export.ensemble`). NumPy only, so training imports neither scikit-learn nor pywavelets.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_scaling", "standardise"]


def fit_scaling(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(median, mean, scale)`` float64 of the training rows ``values [n, features]``; non-finite is missing."""
    values = np.asarray(values, dtype=np.float64)
    values = np.where(np.isfinite(values), values, np.nan)
    all_nan = np.isnan(values).all(axis=0)
    median = np.zeros(values.shape[1])
    if (~all_nan).any():
        median[~all_nan] = np.nanmedian(values[:, ~all_nan], axis=0)
    filled = np.where(np.isnan(values), median, values)
    with np.errstate(all="ignore"):
        mean = filled.mean(axis=0)
        scale = filled.std(axis=0)
    scale[~np.isfinite(scale) | (scale <= 0)] = 1.0
    mean[~np.isfinite(mean)] = 0.0
    return median, mean, scale


def standardise(values: np.ndarray, median: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(where(isfinite(x), x, median) - mean) / scale`` in float64 (callers cast to the dtype they need)."""
    filled = np.where(np.isfinite(values), values, median)
    return (filled - mean) / scale
