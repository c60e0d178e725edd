"""Radiomics of QSM lesions: the paper's 527 pyradiomics features, fast, Dask-parallel and cached.

``FEATURE_NAMES`` fixes the column order everywhere (DESIGN §4). :func:`extract_lesion_features` gives one
lesion's values, equal to a default pyradiomics call; :func:`extract_subject` a subject's table;
:func:`extract_cohort` a cohort's, on Dask or Ray. :class:`RadiomicsStandardiser` standardises them for
training and export.

Submodules load on first use, so ``import qsmrim.radiomics`` is cheap and never imports Dask, Ray or MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qsmrim.radiomics.feature_names import FEATURE_NAMES, IMAGE_TYPES, N_FEATURES
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, RadiomicsSettings

if TYPE_CHECKING:
    from qsmrim.radiomics.cohort import (
        FEATURE_TABLE_COLUMNS,
        SubjectError,
        SubjectFeatures,
        extract_subject,
        extract_volumes,
    )
    from qsmrim.radiomics.dask_pipeline import (
        CohortFeatures,
        extract_cohort,
        read_features,
        read_subject_features,
    )
    from qsmrim.radiomics.extract import LesionExtractor, LesionFeatures, extract_lesion_features
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
    "CohortFeatures",
    "extract_cohort",
    "read_features",
    "read_subject_features",
    "SubjectFeatures",
    "RadiomicsStandardiser",
]

_LAZY = {
    "LesionFeatures": "extract",
    "LesionExtractor": "extract",
    "extract_lesion_features": "extract",
    "FEATURE_TABLE_COLUMNS": "cohort",
    "SubjectError": "cohort",
    "extract_subject": "cohort",
    "extract_volumes": "cohort",
    "CohortFeatures": "dask_pipeline",
    "extract_cohort": "dask_pipeline",
    "read_features": "dask_pipeline",
    "read_subject_features": "dask_pipeline",
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
