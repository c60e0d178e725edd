"""APRL(RF) comparator (Lou et al. 2021; paper section 2.4): SMOTE + random forest on first-order features.

The original method takes the first-order radiomic features of each lesion, oversamples the rim+
class with SMOTE by the reciprocal of its share, and fits a random forest. Here the features are the
original-image (unfiltered) first-order pyradiomics columns of the 527-feature table on QSM.

This module imports scikit-learn and imbalanced-learn at import time; :mod:`qsmrim.models` loads it
only when :class:`APRLRandomForest` is first used, so the torch models work without them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestClassifier
from sklearn.utils.multiclass import unique_labels
from sklearn.utils.validation import check_is_fitted, check_random_state

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6 has it as a method

    def validate_data(estimator, *args, **kwargs):  # type: ignore[no-redef]
        return estimator._validate_data(*args, **kwargs)


__all__ = ["FIRST_ORDER_PREFIX", "APRLRandomForest"]

logger = logging.getLogger(__name__)

#: pyradiomics name prefix of the original-image first-order features (e.g. ``original_firstorder_Mean``).
FIRST_ORDER_PREFIX = "original_firstorder_"


class APRLRandomForest(ClassifierMixin, BaseEstimator):
    """SMOTE-oversampled random forest on a subset of radiomic columns (APRL(RF)).

    Parameters
    ----------
    features : str or sequence of str or sequence of int or array-like of bool, default="original_firstorder_"
        Which columns of ``X`` the model uses. A string is a name prefix, a sequence of strings are
        exact names (both need column names, see ``feature_names``), a sequence of ints are column
        indices and a boolean array of length ``n_features`` is a mask.
    feature_names : sequence of str, optional
        Names of the columns of ``X``, in order. When None, the columns of a pandas ``X`` are used,
        else ``qsmrim.radiomics.FEATURE_NAMES`` if ``X`` has that many columns.
    oversampling : "reciprocal", float or None, default="reciprocal"
        Factor ``f`` by which SMOTE grows the rim+ class: it goes from ``n`` to ``round(f * n)``
        samples. ``"reciprocal"`` uses ``f = 1 / p`` with ``p`` the rim+ share of the training set
        (paper), which leaves about as many rim+ as rim- samples. None fits without SMOTE.
    k_neighbors : int, default=5
        SMOTE neighbours (reduced to ``n - 1`` when there are fewer rim+ samples).
    n_estimators : int, default=500
        Trees in the forest (the R ``randomForest`` default the original APRL used).
    max_features : {"sqrt", "log2"}, int, float or None, default="sqrt"
        Features considered per split.
    min_samples_leaf : int, default=1
        Minimum samples per leaf.
    n_jobs : int, optional
        Parallel jobs of the forest.
    random_state : int, RandomState instance or None, default=None
        Controls SMOTE and the forest; pass an int for reproducible fits.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        Class labels, ``[0, 1]``.
    n_features_in_ : int
        Columns of ``X`` seen in ``fit``.
    feature_names_in_ : ndarray of str
        Column names, when ``X`` was a pandas DataFrame.
    feature_indices_ : ndarray of int
        Columns of ``X`` the forest uses.
    selected_feature_names_ : list of str or None
        Their names, when known.
    oversampling_factor_ : float
        The factor ``f`` applied to the rim+ class (1.0 without SMOTE).
    class_counts_ : dict
        Samples per class before oversampling.
    class_counts_resampled_ : dict
        Samples per class the forest was fitted on.
    forest_ : RandomForestClassifier
        The fitted forest.

    See Also
    --------
    qsmrim.models.aprl_nn.APRLNN : the neural comparator on all 527 features.

    Notes
    -----
    With ``n`` rim+ samples out of ``N`` and ``p = n / N``, ``"reciprocal"`` grows the rim+ class to
    ``round(n / p) = N`` samples by SMOTE (``N - n`` synthetic rows), so the forest sees the rim+ class
    about as often as the rim- class (``N`` vs ``N - n``).

    References
    ----------
    Lou C. et al., Fully automated detection of paramagnetic rims in multiple sclerosis lesions on 3T
    susceptibility-based MR imaging, NeuroImage: Clinical 32 (2021).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(60, 3)), np.r_[np.ones(10), np.zeros(50)].astype(int)
    >>> clf = APRLRandomForest(features=[0, 1], n_estimators=10, random_state=0).fit(X, y)
    >>> clf.class_counts_resampled_
    {0: 50, 1: 60}
    >>> clf.predict_proba(X).shape
    (60, 2)
    """

    def __init__(
        self,
        features: str | Sequence[str] | Sequence[int] | np.ndarray = FIRST_ORDER_PREFIX,
        *,
        feature_names: Sequence[str] | None = None,
        oversampling: str | float | None = "reciprocal",
        k_neighbors: int = 5,
        n_estimators: int = 500,
        max_features: str | int | float | None = "sqrt",
        min_samples_leaf: int = 1,
        n_jobs: int | None = None,
        random_state: int | np.random.RandomState | None = None,
    ):
        self.features = features
        self.feature_names = feature_names
        self.oversampling = oversampling
        self.k_neighbors = k_neighbors
        self.n_estimators = n_estimators
        self.max_features = max_features
        self.min_samples_leaf = min_samples_leaf
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y) -> APRLRandomForest:  # noqa: N803 - scikit-learn naming
        """Select the columns, oversample rim+ with SMOTE, fit the forest; returns ``self``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Radiomic features (any scaling: trees are invariant to it).
        y : array-like of shape (n_samples,)
            Labels, 1 = rim+ and 0 = rim-; both classes must be present.
        """
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        classes = unique_labels(y)
        if not np.array_equal(classes, [0, 1]):
            raise ValueError(f"y must hold both classes 0 (rim-) and 1 (rim+), not {classes.tolist()}")
        self.classes_ = classes
        y = y.astype(np.int64)
        names = self._column_names(X.shape[1])
        self.feature_indices_ = _resolve_columns(self.features, names, X.shape[1])
        self.selected_feature_names_ = (
            [names[i] for i in self.feature_indices_] if names is not None else None
        )
        rng = check_random_state(self.random_state)

        Xs = X[:, self.feature_indices_]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        self.class_counts_ = {0: n_neg, 1: n_pos}
        factor = self._factor(n_pos, len(y))
        self.oversampling_factor_ = factor
        target = round(factor * n_pos)
        if target > n_pos:
            if n_pos < 2:
                raise ValueError(f"SMOTE needs at least 2 rim+ samples to interpolate, got {n_pos}")
            from imblearn.over_sampling import SMOTE

            smote = SMOTE(
                sampling_strategy={1: target},
                k_neighbors=min(self.k_neighbors, n_pos - 1),
                random_state=rng,
            )
            Xs, y = smote.fit_resample(Xs, y)
        self.class_counts_resampled_ = {0: int((y == 0).sum()), 1: int((y == 1).sum())}
        logger.info(
            "APRL(RF): %d features, rim+ %d -> %d (factor %.2f), rim- %d",
            len(self.feature_indices_),
            n_pos,
            self.class_counts_resampled_[1],
            factor,
            n_neg,
        )
        self.forest_ = RandomForestClassifier(
            n_estimators=self.n_estimators,
            max_features=self.max_features,
            min_samples_leaf=self.min_samples_leaf,
            n_jobs=self.n_jobs,
            random_state=rng,
        ).fit(Xs, y)
        return self

    def predict_proba(self, X) -> np.ndarray:  # noqa: N803
        """Return ``[n_samples, 2]`` class probabilities (column 1 is rim+)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.forest_.predict_proba(X[:, self.feature_indices_])

    def predict(self, X) -> np.ndarray:  # noqa: N803
        """Return the most probable class per row."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def _validate_params(self) -> None:
        o = self.oversampling
        if o is not None and o != "reciprocal":
            if isinstance(o, bool) or not isinstance(o, Real):
                raise TypeError(
                    f"oversampling must be 'reciprocal', a number >= 1 or None, not {type(o).__name__}"
                )
            if not o >= 1:
                raise ValueError(f"oversampling must be 'reciprocal', a number >= 1 or None, not {o}")
        for name in ("k_neighbors", "n_estimators", "min_samples_leaf"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"{name} must be a positive integer, not {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, not {v}")

    def _factor(self, n_pos: int, n_total: int) -> float:
        if self.oversampling is None:
            return 1.0
        if self.oversampling == "reciprocal":
            return n_total / n_pos
        return float(self.oversampling)

    def _column_names(self, n_features: int) -> list[str] | None:
        if self.feature_names is not None:
            names = [str(n) for n in self.feature_names]
            if len(names) != n_features:
                raise ValueError(f"feature_names has {len(names)} names but X has {n_features} columns")
            return names
        if hasattr(self, "feature_names_in_"):
            return [str(n) for n in self.feature_names_in_]
        try:
            from qsmrim.radiomics import FEATURE_NAMES
        except ImportError:
            return None
        return list(FEATURE_NAMES) if len(FEATURE_NAMES) == n_features else None


def _resolve_columns(features: object, names: list[str] | None, n_features: int) -> np.ndarray:
    """Turn the ``features`` selector into column indices, in the order given."""
    if isinstance(features, str):
        if names is None:
            raise ValueError(
                f"features={features!r} is a name prefix but the column names are unknown; "
                "pass feature_names=..., a pandas DataFrame, or column indices"
            )
        idx = [i for i, n in enumerate(names) if n.startswith(features)]
        if not idx:
            raise ValueError(f"No column name starts with {features!r}")
        return np.asarray(idx, dtype=np.intp)
    arr = np.asarray(features)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"features must be a prefix, or a non-empty 1-d list of names, indices or a mask, not {features!r}"
        )
    if arr.dtype == bool:
        if arr.size != n_features:
            raise ValueError(f"features mask has {arr.size} entries but X has {n_features} columns")
        return np.flatnonzero(arr)
    if arr.dtype.kind in "US":
        if names is None:
            raise ValueError("features are names but the column names are unknown; pass feature_names=...")
        lookup = {n: i for i, n in enumerate(names)}
        missing = [str(f) for f in arr if f not in lookup]
        if missing:
            raise ValueError(f"Unknown feature names in features: {missing[:5]}")
        return np.asarray([lookup[str(f)] for f in arr], dtype=np.intp)
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() >= n_features:
            raise ValueError(f"features indices must be in [0, {n_features}), not {arr.tolist()}")
        return arr.astype(np.intp)
    raise TypeError(f"features must be a str, names, indices or a bool mask, not dtype {arr.dtype}")
