"""Radiomics of QSM lesions: the paper's 527 pyradiomics features, fast and cached.

``FEATURE_NAMES`` fixes the column order everywhere (DESIGN §4). :func:`extract_lesion_features` gives one
lesion's values, equal to a default pyradiomics call; :func:`extract_subject` a subject's table;
:mod:`qsmrim.radiomics.tasks` cuts a cohort into tasks and :mod:`qsmrim.radiomics.cache` keeps their Parquet
cache (:func:`read_features`). Running the tasks on Dask or Ray is the platform's job
(:func:`qsmrim.fanout.features.extract_cohort`). :class:`RadiomicsStandardiser` is the scikit-learn-style
standardiser of the features, whose formula (:mod:`qsmrim.radiomics.scaling`) training members and the ONNX
graph share.

Submodules load on first use, so ``import qsmrim.radiomics`` is cheap; this package never imports Dask,
distributed, Ray, MLflow or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qsmrim.radiomics.feature_names import FEATURE_NAMES, IMAGE_TYPES, N_FEATURES

if TYPE_CHECKING:
    from qsmrim.radiomics.cache import read_features, read_subject_features
    from qsmrim.radiomics.cohort import (
        FEATURE_TABLE_COLUMNS,
        SubjectError,
        SubjectFeatures,
        extract_subject,
        extract_volumes,
    )
    from qsmrim.radiomics.extract import LesionExtractor, LesionFeatures, extract_lesion_features
    from qsmrim.radiomics.settings import DEFAULT_SETTINGS, RadiomicsSettings
    from qsmrim.radiomics.standardise import RadiomicsStandardiser

__all__ = [
    "FEATURE_NAMES",
    "IMAGE_TYPES",
    "N_FEATURES",
    "DEFAULT_SETTINGS",
    "RadiomicsSettings",
    "LesionFeatures",
    "LesionExtractor",
    "extract_lesion_features",
    "FEATURE_TABLE_COLUMNS",
    "SubjectError",
    "extract_subject",
    "extract_volumes",
    "read_features",
    "read_subject_features",
    "SubjectFeatures",
    "RadiomicsStandardiser",
]

_LAZY = {
    "DEFAULT_SETTINGS": "settings",  # pywavelets checks the settings: not needed by qsmrim.radiomics.scaling's users
    "RadiomicsSettings": "settings",
    "LesionFeatures": "extract",
    "LesionExtractor": "extract",
    "extract_lesion_features": "extract",
    "FEATURE_TABLE_COLUMNS": "cohort",
    "SubjectError": "cohort",
    "extract_subject": "cohort",
    "extract_volumes": "cohort",
    "read_features": "cache",
    "read_subject_features": "cache",
    "SubjectFeatures": "cohort",
    "RadiomicsStandardiser": "standardise",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
