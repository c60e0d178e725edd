"""The Parquet cache of cohort radiomics: content keys, per-subject files and the merged table.

Layout of a features folder ``out_dir``::

    subjects/<subject>.parquet    one file per subject, written as soon as the subject is complete:
                                  subject, lesion, status, reason, features (a fixed-size list of 527
                                  float64 in FEATURE_NAMES order; one column, as 531-column Parquet files
                                  of ~25 rows cost ~10x more to write and read)
    features.parquet              the merged table: subject, lesion, status, reason, 527 feature columns

Each subject file carries a content hash of its inputs (QSM and lesion map bytes), the settings and the
extraction code version in its Parquet metadata (:func:`subject_key`); a re-run skips subjects whose hash
matches, so a crashed run resumes and a changed input or setting recomputes. Files are written to a
temporary name and renamed, so a failure never leaves a partial Parquet behind.

This module is the science side of :func:`qsmrim.fanout.features.extract_cohort` (which only schedules);
it imports neither Dask nor Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qsmrim.atomic import atomic_path
from qsmrim.radiomics.cohort import FEATURE_TABLE_COLUMNS, ID_COLUMNS, SubjectFeatures
from qsmrim.radiomics.feature_names import FEATURE_NAMES, N_FEATURES
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, PYRADIOMICS_VERSION, RadiomicsSettings

if TYPE_CHECKING:
    from qsmrim.data import SubjectFiles

__all__ = [
    "EXTRACTION_VERSION",
    "FEATURES_FILE",
    "SUBJECTS_DIR",
    "read_features",
    "read_subject_features",
    "stored_key",
    "subject_key",
    "subject_path",
    "write_features",
    "write_subject_features",
]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.parquet"
SUBJECTS_DIR = "subjects"
EXTRACTION_VERSION = "1"
"""Bump when a code change alters feature values or the table layout: every cached subject is recomputed."""

_META_KEY = b"qsmrim.radiomics"


def read_features(out_dir: str | Path) -> pd.DataFrame:
    """The merged table written by :func:`qsmrim.fanout.features.extract_cohort` (:data:`FEATURE_TABLE_COLUMNS`)."""
    return pd.read_parquet(Path(out_dir) / FEATURES_FILE)


def read_subject_features(path: str | Path) -> SubjectFeatures:
    """One per-subject file of ``out_dir/subjects/`` as arrays (``.to_frame()`` gives the wide table)."""
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    values = arrow.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    subject = json.loads((arrow.schema.metadata or {}).get(_META_KEY, b"{}")).get("subject", "")
    return SubjectFeatures(
        subject,
        arrow.column("lesion").to_numpy().astype(np.int32),
        tuple(arrow.column("status").to_pylist()),
        tuple(arrow.column("reason").to_pylist()),
        values.reshape(-1, N_FEATURES).astype(np.float64, copy=False),
    )


def subject_key(files: SubjectFiles, settings: RadiomicsSettings = DEFAULT_SETTINGS) -> str:
    """Content hash of everything a subject's features depend on: image bytes, settings, code version."""
    from qsmrim.data import file_digest

    h = hashlib.sha256()
    for part in (
        EXTRACTION_VERSION,
        settings.digest,
        hashlib.sha256("\n".join(FEATURE_NAMES).encode()).hexdigest(),
        files.lesions_kind,
        file_digest(files.qsm),
        file_digest(files.lesions),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def subject_path(out: Path, subject: str) -> Path:
    """``out/subjects/<subject>.parquet``, the subject id made safe as a file name."""
    return out / SUBJECTS_DIR / f"{_safe_name(subject)}.parquet"


def stored_key(path: Path) -> str | None:
    """The :func:`subject_key` a cached subject file was written with, or None (missing or unreadable)."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(_META_KEY, b"{}")).get("key")
    except Exception:  # noqa: BLE001 - an unreadable cache file is simply recomputed
        log.warning("ignoring unreadable cache file %s", path)
        return None


def write_subject_features(
    features: SubjectFeatures, path: Path, key: str, settings: RadiomicsSettings
) -> None:
    """Write one subject's file atomically, with its cache ``key`` and the provenance in the metadata."""
    meta = {"key": key, "subject": features.subject, **_provenance(settings)}
    _write_parquet(_subject_table(features), path, meta)


def write_features(parts: Sequence[SubjectFeatures], path: Path, settings: RadiomicsSettings) -> pd.DataFrame:
    """Write the merged table of ``parts`` (in cohort order) atomically to ``path`` and return it."""
    arrow = _wide_table(parts)
    _write_parquet(arrow, path, {"subjects": len(parts), **_provenance(settings)})
    return arrow.to_pandas()


# -- Parquet --------------------------------------------------------------------------------------------------


def _subject_table(features: SubjectFeatures) -> Any:
    """Arrow table of one subject with the 527 values as one fixed-size-list column."""
    import pyarrow as pa

    values = pa.array(np.ascontiguousarray(features.values, dtype=np.float64).reshape(-1))
    return pa.Table.from_arrays(
        [*_id_arrays(features), pa.FixedSizeListArray.from_arrays(values, N_FEATURES)],
        names=[*ID_COLUMNS, "features"],
    )


def _wide_table(parts: Sequence[SubjectFeatures]) -> Any:
    """The merged Arrow table: id columns, then one float64 column per feature, in cohort order."""
    import pyarrow as pa

    ids = [pa.concat_arrays(list(cols)) for cols in zip(*(_id_arrays(p) for p in parts), strict=True)]
    if not parts:
        ids = [pa.array([], t) for t in (pa.string(), pa.int32(), pa.string(), pa.string())]
    values = np.concatenate([p.values for p in parts]) if parts else np.empty((0, N_FEATURES))
    columns = [pa.array(np.ascontiguousarray(values[:, j])) for j in range(N_FEATURES)]
    return pa.Table.from_arrays([*ids, *columns], names=list(FEATURE_TABLE_COLUMNS))


def _id_arrays(features: SubjectFeatures) -> list[Any]:
    import pyarrow as pa

    return [
        pa.array([features.subject] * len(features), pa.string()),
        pa.array(np.asarray(features.lesions, dtype=np.int32), pa.int32()),
        pa.array(list(features.status), pa.string()),
        pa.array(list(features.reason), pa.string()),
    ]


def _write_parquet(arrow: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write an Arrow table atomically: a temporary file in the same folder, then ``os.replace``."""
    import pyarrow.parquet as pq

    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()}
    )
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def _provenance(settings: RadiomicsSettings) -> dict[str, Any]:
    import pywt
    import radiomics

    return {
        "extraction_version": EXTRACTION_VERSION,
        "settings": dataclasses.asdict(settings),
        "settings_digest": settings.digest,
        "pyradiomics": str(getattr(radiomics, "__version__", PYRADIOMICS_VERSION)),
        "pywavelets": pywt.__version__,
        "numpy": np.__version__,
        "n_features": len(FEATURE_NAMES),
    }


def _safe_name(subject: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in subject) or "_"
