"""APRL(RF): first-order column selection, SMOTE by the reciprocal of the rim+ share, scikit-learn contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from qsmrim.models import APRLRandomForest

NAMES = [
    "original_firstorder_Mean",
    "original_firstorder_Median",
    "original_glcm_Contrast",
    "wavelet-LLH_firstorder_Mean",
    "original_shape_Sphericity",
    "original_firstorder_Energy",
]


@pytest.fixture
def data():
    """200 lesions, 10 rim+ (5%), rim+ shifted on the first-order columns only."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, len(NAMES)))
    y = np.zeros(200, dtype=int)
    y[:10] = 1
    X[:10, [0, 1, 5]] += 3.0
    return X, y


def fit(X, y, **params):
    return APRLRandomForest(**{"feature_names": NAMES, "n_estimators": 20, "random_state": 0, **params}).fit(
        X, y
    )


def test_aprl_rf_oversamples_by_reciprocal_share(data):
    """Check that rim+ grows by 1/p (10 of 200 -> factor 20 -> 200 rim+) and rim- is untouched."""
    X, y = data
    clf = fit(X, y)
    assert clf.oversampling_factor_ == pytest.approx(20.0)
    assert clf.class_counts_ == {0: 190, 1: 10}
    assert clf.class_counts_resampled_ == {0: 190, 1: 200}


@pytest.mark.parametrize("oversampling, n_pos", [(3.0, 30), (2.5, 25), (1.0, 10), (None, 10)])
def test_aprl_rf_oversampling_factor(data, oversampling, n_pos):
    """Check that a numeric factor grows rim+ to round(f * n) and None disables SMOTE."""
    X, y = data
    clf = fit(X, y, oversampling=oversampling)
    assert clf.class_counts_resampled_ == {0: 190, 1: n_pos}


def test_aprl_rf_selects_original_first_order_by_default(data):
    """Check that the default selector keeps only original_firstorder_* columns, in table order."""
    X, y = data
    clf = fit(X, y)
    assert clf.feature_indices_.tolist() == [0, 1, 5]
    assert clf.selected_feature_names_ == [NAMES[0], NAMES[1], NAMES[5]]
    assert clf.forest_.n_features_in_ == 3


@pytest.mark.parametrize(
    "features, expected",
    [
        ([2, 4], [2, 4]),
        (np.array([True, False, False, True, False, False]), [0, 3]),
        (["original_glcm_Contrast", "original_firstorder_Mean"], [2, 0]),
        ("wavelet-", [3]),
    ],
)
def test_aprl_rf_feature_selectors(data, features, expected):
    """Check indices, boolean masks, exact names and prefixes as column selectors."""
    X, y = data
    assert fit(X, y, features=features).feature_indices_.tolist() == expected


def test_aprl_rf_dataframe_columns(data):
    """Check that a DataFrame's columns name the features and are required again at predict time."""
    X, y = data
    df = pd.DataFrame(X, columns=NAMES)
    clf = APRLRandomForest(n_estimators=10, random_state=0).fit(df, y)
    assert clf.feature_indices_.tolist() == [0, 1, 5]
    assert list(clf.feature_names_in_) == NAMES
    assert clf.predict_proba(df).shape == (200, 2)


def test_aprl_rf_ignores_unselected_columns(data):
    """Check that changing columns outside the selection does not change the prediction."""
    X, y = data
    clf = fit(X, y)
    X2 = X.copy()
    X2[:, [2, 3, 4]] = 100.0
    assert_allclose(clf.predict_proba(X2), clf.predict_proba(X))


def test_aprl_rf_learns_and_is_reproducible(data):
    """Check that the forest separates the shifted rim+ rows and that random_state makes fits identical."""
    X, y = data
    a, b = fit(X, y), fit(X, y)
    proba = a.predict_proba(X)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert_allclose(proba, b.predict_proba(X))
    assert proba[y == 1, 1].mean() > 0.5 > proba[y == 0, 1].mean()
    assert (a.predict(X) == y).mean() > 0.95
    assert a.classes_.tolist() == [0, 1]


def test_aprl_rf_clone_and_params():
    """Check the scikit-learn estimator contract: params stored unchanged, clone works."""
    clf = APRLRandomForest(features=[0, 1], n_estimators=7, random_state=3)
    params = clf.get_params()
    assert params["features"] == [0, 1] and params["n_estimators"] == 7 and params["random_state"] == 3
    assert clone(clf).get_params()["n_estimators"] == 7


def test_aprl_rf_not_fitted(data):
    """Check that predict_proba before fit raises NotFittedError."""
    X, _ = data
    with pytest.raises(NotFittedError):
        APRLRandomForest().predict_proba(X)


def test_aprl_rf_feature_count_checked(data):
    """Check that predicting with a different number of columns raises ValueError."""
    X, y = data
    clf = fit(X, y)
    with pytest.raises(ValueError, match="features"):
        clf.predict_proba(X[:, :4])


@pytest.mark.parametrize(
    "params, err_type, err_msg",
    [
        (
            {"oversampling": 0.5},
            ValueError,
            "oversampling must be 'reciprocal', a number >= 1 or None, not 0.5",
        ),
        ({"oversampling": "balanced"}, TypeError, "oversampling must be 'reciprocal'"),
        ({"k_neighbors": 0}, ValueError, "k_neighbors must be a positive integer, not 0"),
        ({"n_estimators": 2.5}, TypeError, "n_estimators must be a positive integer"),
        ({"features": "nothing_"}, ValueError, "No column name starts with 'nothing_'"),
        ({"features": ["original_firstorder_Foo"]}, ValueError, "Unknown feature names"),
        ({"features": [0, 9]}, ValueError, "features indices must be in \\[0, 6\\)"),
        (
            {"features": np.array([True, False])},
            ValueError,
            "features mask has 2 entries but X has 6 columns",
        ),
        ({"feature_names": NAMES[:3]}, ValueError, "feature_names has 3 names but X has 6 columns"),
    ],
)
def test_aprl_rf_invalid_params(data, params, err_type, err_msg):
    """Check that bad parameters fail in fit with a message naming them."""
    X, y = data
    with pytest.raises(err_type, match=err_msg):
        fit(X, y, **params)


def test_aprl_rf_prefix_needs_names(data):
    """Check that a name prefix without any column names asks for feature_names."""
    X, y = data
    with pytest.raises(ValueError, match="pass feature_names"):
        APRLRandomForest(n_estimators=5).fit(X, y)


def test_aprl_rf_needs_both_classes(data):
    """Check that y without rim+ rows is rejected."""
    X, _ = data
    with pytest.raises(ValueError, match="both classes"):
        fit(X, np.zeros(200, dtype=int))
