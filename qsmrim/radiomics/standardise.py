"""Standardisation of the 527 radiomic features, fitted on a training fold only (scikit-learn style).

The served model takes raw pyradiomics values and standardises them inside the ONNX graph (DESIGN §5). The
formula has one home, :mod:`qsmrim.radiomics.scaling`: this class, the training members'
:class:`qsmrim.training.Standardisation` and the exported graph (:mod:`qsmrim.export.ensemble`) all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from qsmrim.radiomics.feature_names import FEATURE_NAMES
from qsmrim.radiomics.scaling import fit_scaling, standardise

__all__ = ["RadiomicsStandardiser"]


class RadiomicsStandardiser(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Fill missing features with the training median, then centre and scale each feature.

    Radiomics tables have NaN where pyradiomics cannot describe a lesion (one voxel, a line); a median fill
    keeps those lesions usable without letting them move the mean. Features that are constant on the
    training fold get ``scale_ = 1`` so they map to 0 instead of dividing by zero.

    Parameters
    ----------
    clip : float or None, default=None
        If set, standardised values are clipped to ``[-clip, clip]`` (radiomic features are heavy-tailed).
    dtype : numpy dtype, default=numpy.float32
        Output dtype of :meth:`transform` (the model and the ONNX graph take float32).

    Attributes
    ----------
    median_ : ndarray of shape (n_features,)
        Training median of each feature, ignoring NaN (0 for a feature that is NaN throughout).
    mean_ : ndarray of shape (n_features,)
        Training mean after the median fill.
    scale_ : ndarray of shape (n_features,)
        Training standard deviation (ddof=0) after the median fill; 1 where it is 0 or not finite.
    n_features_in_ : int
        Number of features seen in :meth:`fit`.
    feature_names_in_ : ndarray of shape (n_features,)
        Feature names seen in :meth:`fit`; :data:`FEATURE_NAMES` when fitted on a plain array of 527 columns.

    Notes
    -----
    :math:`z_{ij} = (\\tilde x_{ij} - \\mu_j) / \\sigma_j`, with :math:`\\tilde x_{ij} = x_{ij}` if finite,
    else the training median of feature :math:`j`. Infinite values count as missing.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(20, 527)); X[0, 3] = np.nan
    >>> z = RadiomicsStandardiser().fit(X).transform(X)
    >>> z.shape, bool(np.isfinite(z).all())
    ((20, 527), True)
    """

    def __init__(self, *, clip: float | None = None, dtype: Any = np.float32):
        self.clip = clip
        self.dtype = dtype

    def fit(self, X: Any, y: Any = None) -> RadiomicsStandardiser:
        """Learn median, mean and scale from the training fold ``X`` (DataFrame or array, lesions x features)."""
        if self.clip is not None and (
            isinstance(self.clip, bool) or not isinstance(self.clip, Real) or not self.clip > 0
        ):
            raise ValueError(f"clip must be a number > 0 or None, not {self.clip!r}")
        values, names = _as_matrix(X, None)
        if values.shape[0] < 1:
            raise ValueError(
                f"RadiomicsStandardiser needs at least 1 sample to fit, got X of shape {values.shape}"
            )
        self.median_, self.mean_, self.scale_ = fit_scaling(values)
        self.n_features_in_ = values.shape[1]
        self.feature_names_in_ = np.asarray(names, dtype=object)
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Median-fill, centre and scale ``X``; a DataFrame is reordered to ``feature_names_in_`` first."""
        check_is_fitted(self)
        values, _ = _as_matrix(X, list(self.feature_names_in_))
        if values.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {values.shape[1]} features, but RadiomicsStandardiser is expecting {self.n_features_in_} features as input"
            )
        z = standardise(values, self.median_, self.mean_, self.scale_)
        if self.clip is not None:
            z = np.clip(z, -self.clip, self.clip)
        return z.astype(self.dtype)

    def export_params(self) -> dict[str, np.ndarray]:
        """The fitted arrays as float32, for building the standardisation into the ONNX graph."""
        check_is_fitted(self)
        return {name: getattr(self, f"{name}_").astype(np.float32) for name in ("median", "mean", "scale")}


def _as_matrix(X: Any, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """(values as float64, feature names); a DataFrame must hold every expected name (others are ignored)."""
    columns = getattr(X, "columns", None)
    if columns is not None:
        wanted = (
            list(names) if names is not None else [str(c) for c in columns if str(c) in set(FEATURE_NAMES)]
        )
        if not wanted:
            raise ValueError("X has none of the radiomic feature columns (qsmrim.radiomics.FEATURE_NAMES)")
        missing = [n for n in wanted if n not in set(map(str, columns))]
        if missing:
            raise ValueError(f"X is missing {len(missing)} feature column(s) seen in fit, e.g. {missing[:3]}")
        return np.asarray(X[wanted], dtype=np.float64), wanted
    values = np.asarray(X, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"X must be 2-D (lesions x features), not {values.ndim}-D")
    if names is None:
        names = (
            list(FEATURE_NAMES)
            if values.shape[1] == len(FEATURE_NAMES)
            else [f"x{i}" for i in range(values.shape[1])]
        )
    return values, list(names)
