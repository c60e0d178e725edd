"""Radiomics of one subject: a pure function from input files (and lesion indices) to a feature table.

This is the unit of work of :mod:`qsmrim.radiomics.tasks`, which :mod:`qsmrim.fanout.features` fans out; it also serves single-subject
callers (inference on an upload) directly. It never raises for a lesion pyradiomics cannot describe (that
lesion gets NaN and a reason) nor for a lesion whose extraction fails unexpectedly (status ``failed`` with
the error); it raises :class:`SubjectError`, naming the subject and lesion, only for bad input.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage

from qsmrim.data.errors import InputError, Problem
from qsmrim.radiomics.extract import LesionExtractor, LesionFeatures, scale_qsm
from qsmrim.radiomics.feature_names import FEATURE_NAMES, N_FEATURES
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, RadiomicsSettings

if TYPE_CHECKING:
    from qsmrim.data import SubjectFiles, SubjectVolumes

__all__ = [
    "SubjectError",
    "SubjectFeatures",
    "subject_features",
    "volume_features",
    "FEATURE_TABLE_COLUMNS",
    "extract_subject",
    "extract_volumes",
    "empty_feature_table",
]

log = logging.getLogger(__name__)

ID_COLUMNS: tuple[str, ...] = ("subject", "lesion", "status", "reason")
"""Leading columns of every feature table; the 527 :data:`FEATURE_NAMES` follow."""

FEATURE_TABLE_COLUMNS: tuple[str, ...] = ID_COLUMNS + FEATURE_NAMES


class SubjectError(InputError):
    """Bad input for one subject (unreadable file, grid mismatch, missing lesion); names subject and lesion."""

    def __init__(
        self, subject: str, what: str, *, lesion: int | None = None, problems: Sequence[Problem] = ()
    ):
        where = f"subject {subject}" + (f", lesion {lesion}" if lesion is not None else "")
        self.subject = subject
        self.lesion = lesion
        super().__init__(
            [Problem(where, what)] + [Problem(f"subject {subject}: {p.where}", p.what) for p in problems]
        )


@dataclass(frozen=True)
class SubjectFeatures:
    """One subject's features as arrays (the compact form tasks return): rows sorted by lesion index."""

    subject: str
    lesions: np.ndarray  # int32 [n]
    status: tuple[str, ...]
    reason: tuple[str, ...]
    values: np.ndarray  # float64 [n, 527], FEATURE_NAMES order

    def __len__(self) -> int:
        return len(self.lesions)

    def to_frame(self) -> pd.DataFrame:
        """The table with :data:`FEATURE_TABLE_COLUMNS`."""
        ids = pd.DataFrame(
            {
                "subject": [self.subject] * len(self),
                "lesion": np.asarray(self.lesions, dtype=np.int32),
                "status": list(self.status),
                "reason": list(self.reason),
            }
        )
        return pd.concat([ids, pd.DataFrame(self.values, columns=list(FEATURE_NAMES))], axis=1)

    @staticmethod
    def concat(parts: Sequence[SubjectFeatures]) -> SubjectFeatures:
        """Chunks of one subject joined and sorted by lesion index."""
        if len({p.subject for p in parts}) != 1:
            raise ValueError(
                f"cannot join chunks of different subjects: {sorted({p.subject for p in parts})}"
            )
        lesions = np.concatenate([p.lesions for p in parts])
        order = np.argsort(lesions, kind="stable")
        status = [s for p in parts for s in p.status]
        reason = [r for p in parts for r in p.reason]
        return SubjectFeatures(
            parts[0].subject,
            lesions[order].astype(np.int32),
            tuple(status[i] for i in order),
            tuple(reason[i] for i in order),
            np.concatenate([p.values for p in parts])[order],
        )


def extract_subject(
    files: SubjectFiles,
    lesions: Sequence[int] | None = None,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    *,
    expect_lesions: Collection[int] | None = None,
) -> pd.DataFrame:
    """Load one subject and return the features of its lesions (all, or the given indices).

    Args:
        files: The subject's input paths (from :func:`qsmrim.data.discover_cohort`).
        lesions: Lesion indices to extract, in any order; ``None`` means every lesion in the map.
        settings: Extraction settings.
        expect_lesions: Every lesion index the caller planned for this subject (the pipeline passes it to
            one chunk per subject): the map must hold exactly these, so a map that changed after
            planning, or a label TSV that disagrees with it, cannot go unnoticed.

    Returns:
        One row per lesion, sorted by lesion index, with :data:`FEATURE_TABLE_COLUMNS`.

    Raises:
        SubjectError: an input cannot be read or is invalid, or a requested lesion is not in the map.
    """
    return subject_features(files, lesions, settings, expect_lesions=expect_lesions).to_frame()


def subject_features(
    files: SubjectFiles,
    lesions: Sequence[int] | None = None,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    *,
    expect_lesions: Collection[int] | None = None,
) -> SubjectFeatures:
    """:func:`extract_subject` as arrays (what the cohort pipeline's tasks return)."""
    from qsmrim.data import load_subject

    # Rim labels do not change features; leave their validation to the data layer.
    try:
        volumes = load_subject(dataclasses.replace(files, labels=None))
    except InputError as exc:
        raise SubjectError(files.subject, "cannot load the subject's images", problems=exc.problems) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a truncated gzip: still name the subject and file
        raise SubjectError(
            files.subject, f"cannot read inputs ({files.qsm}, {files.lesions}): {exc}"
        ) from exc
    return volume_features(volumes, lesions, settings, expect_lesions=expect_lesions)


def extract_volumes(
    volumes: SubjectVolumes,
    lesions: Sequence[int] | None = None,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    *,
    expect_lesions: Collection[int] | None = None,
) -> pd.DataFrame:
    """Features of lesions of an already loaded subject (see :func:`extract_subject`)."""
    return volume_features(volumes, lesions, settings, expect_lesions=expect_lesions).to_frame()


def volume_features(
    volumes: SubjectVolumes,
    lesions: Sequence[int] | None = None,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    *,
    expect_lesions: Collection[int] | None = None,
) -> SubjectFeatures:
    """:func:`extract_volumes` as arrays."""
    subject = volumes.subject
    if volumes.qsm.shape != volumes.instances.shape:
        raise SubjectError(
            subject, f"QSM shape {volumes.qsm.shape} differs from lesion map shape {volumes.instances.shape}"
        )
    from qsmrim.data.cohort import compact_instances

    # find_objects allocates by the largest label: run it on labels 1..K, not on the map's own indices
    compact, index_of = compact_instances(np.asarray(volumes.instances))
    boxes = ndimage.find_objects(compact)
    label_of = {int(index_of[k + 1]): k + 1 for k, box in enumerate(boxes) if box is not None}
    present = set(label_of)
    wanted = sorted(present) if lesions is None else sorted(int(i) for i in lesions)
    for index in wanted:
        if index not in present:
            raise SubjectError(subject, "lesion index not found in the lesion map", lesion=index)
    if expect_lesions is not None:
        missing = sorted(set(expect_lesions) - present)
        if missing:
            raise SubjectError(subject, "lesion index not found in the lesion map", lesion=missing[0])
        extra = sorted(present - set(expect_lesions))
        if extra:
            raise SubjectError(
                subject, f"lesion map holds lesion(s) {extra[:10]} that the label TSV does not list"
            )

    extractor = LesionExtractor.for_settings(settings)
    image = scale_qsm(volumes.qsm, settings)
    spacing = volumes.spacing
    values = np.full((len(wanted), N_FEATURES), np.nan)
    status: list[str] = []
    reason: list[str] = []
    for row, index in enumerate(wanted):
        box = boxes[label_of[index] - 1]
        try:
            result = extractor.extract(image, compact[box] == label_of[index], spacing, box)
        except Exception as exc:  # noqa: BLE001 - one lesion's failure must not stop the subject
            log.warning("subject %s, lesion %d: extraction failed: %s", subject, index, exc)
            log.debug("%s", traceback.format_exc())
            result = LesionFeatures(np.full(N_FEATURES, np.nan), "failed", f"{type(exc).__name__}: {exc}")
        values[row] = result.values
        status.append(result.status)
        reason.append(result.reason)
        if result.status != "ok":
            log.info("subject %s, lesion %d: %s (%s)", subject, index, result.status, result.reason)
    return SubjectFeatures(subject, np.asarray(wanted, dtype=np.int32), tuple(status), tuple(reason), values)


def empty_feature_table() -> pd.DataFrame:
    """A zero-row table with the right columns and dtypes."""
    return SubjectFeatures("", np.empty(0, np.int32), (), (), np.empty((0, N_FEATURES))).to_frame()
