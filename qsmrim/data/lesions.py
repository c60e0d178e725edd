"""The lesion table: one row per lesion instance with its geometry and rim label."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from qsmrim.data.bids import LesionSource, participant_of
from qsmrim.data.cohort import Cohort, SubjectVolumes, compact_instances, load_subject
from qsmrim.data.errors import InputError, Problem

__all__ = ["LESION_TABLE_COLUMNS", "lesion_rows", "build_lesion_table", "iter_subjects", "ValidationReport", "validate_cohort"]

log = logging.getLogger(__name__)

LESION_TABLE_COLUMNS = (
    "subject", "lesion", "n_voxels", "volume_mm3",
    "centroid_vox_x", "centroid_vox_y", "centroid_vox_z",
    "centroid_mm_x", "centroid_mm_y", "centroid_mm_z",
    "bbox_x0", "bbox_y0", "bbox_z0", "bbox_x1", "bbox_y1", "bbox_z1",
    "rim",
)  # fmt: skip
"""Columns of the lesion table. Voxel coordinates are RAS+ canonical indices; bbox is [x0, x1) etc.;
``rim`` is 1, 0 or missing (``n/a``: kept for inference, excluded from training)."""


def lesion_rows(vol: SubjectVolumes) -> list[dict]:
    """Geometry and label of every lesion of one subject, ascending by lesion index."""
    indices = vol.lesion_indices
    if not indices:
        return []
    voxel_mm3 = float(abs(np.linalg.det(vol.affine[:3, :3])))
    # sized by the number of lesions, not by the largest index (a lesion labelled 10^8 is one lesion)
    compact, index_of = compact_instances(vol.instances)
    labels = list(range(1, len(index_of)))
    counts = np.bincount(compact.ravel(), minlength=len(index_of))
    coms = ndimage.center_of_mass(np.ones_like(compact, dtype=np.float32), compact, labels)
    slices = ndimage.find_objects(compact)
    rows = []
    for k, idx, com in zip(labels, indices, coms, strict=True):
        if int(index_of[k]) != idx:
            raise RuntimeError(f"sub-{vol.subject}: lesion {idx} relabelled as {int(index_of[k])}")
        sl = slices[k - 1]
        mm = vol.affine @ np.array([*com, 1.0])
        rows.append(
            {
                "subject": vol.subject,
                "lesion": idx,
                "n_voxels": int(counts[k]),
                "volume_mm3": float(counts[k]) * voxel_mm3,
                "centroid_vox_x": float(com[0]),
                "centroid_vox_y": float(com[1]),
                "centroid_vox_z": float(com[2]),
                "centroid_mm_x": float(mm[0]),
                "centroid_mm_y": float(mm[1]),
                "centroid_mm_z": float(mm[2]),
                "bbox_x0": sl[0].start, "bbox_y0": sl[1].start, "bbox_z0": sl[2].start,
                "bbox_x1": sl[0].stop, "bbox_y1": sl[1].stop, "bbox_z1": sl[2].stop,
                "rim": vol.labels.get(idx),
            }
        )  # fmt: skip
    return rows


def _to_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(LESION_TABLE_COLUMNS))
    df["rim"] = pd.array([None if v is None or pd.isna(v) else int(v) for v in df["rim"]], dtype="Int8")
    df["subject"] = df["subject"].astype(str)
    for col in ("lesion", "n_voxels", "bbox_x0", "bbox_y0", "bbox_z0", "bbox_x1", "bbox_y1", "bbox_z1"):
        df[col] = df[col].astype(np.int64)
    return df


def iter_subjects(cohort: Cohort) -> Iterator[SubjectVolumes]:
    """Load each subject in turn; raises :class:`InputError` at the first invalid subject."""
    for files in cohort.subjects:
        yield load_subject(files)


def build_lesion_table(cohort: Cohort | Iterable[SubjectVolumes]) -> pd.DataFrame:
    """The cohort's lesion table (columns :data:`LESION_TABLE_COLUMNS`), sorted by subject and lesion."""
    vols = iter_subjects(cohort) if isinstance(cohort, Cohort) else cohort
    rows: list[dict] = []
    for vol in vols:
        rows += lesion_rows(vol)
    return _to_frame(rows).sort_values(["subject", "lesion"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_cohort` found: the summary of a valid cohort, or every problem."""

    n_subjects: int
    problems: tuple[Problem, ...]
    table: pd.DataFrame | None
    spacings: tuple[tuple[float, float, float], ...]
    scans: tuple[str, ...] = ()
    """Scan ids of the cohort (``01``, ``01_ses-02``); ``n_subjects`` counts these scans."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        """Counts for a valid cohort: subjects, scans, lesions, rim+ count and share, unlabelled, voxel sizes."""
        t = self.table if self.table is not None else _to_frame([])
        labelled = t["rim"].dropna()
        n_pos = int((labelled == 1).sum())
        return {
            "subjects": len({participant_of(x) for x in self.scans}),
            "scans": self.n_subjects,
            "lesions": len(t),
            "labelled": len(labelled),
            "rim_pos": n_pos,
            "rim_pos_share": n_pos / len(labelled) if len(labelled) else float("nan"),
            "unlabelled": int(t["rim"].isna().sum()),
            "voxel_sizes_mm": sorted({tuple(round(v, 4) for v in s) for s in self.spacings}),
        }


def validate_cohort(source: Cohort | str | Path, *, progress: bool = False,
                    on_subject: Callable[[SubjectVolumes], None] | None = None,
                    lesions: LesionSource | None = None) -> ValidationReport:  # fmt: skip
    """Check every scan of a cohort and collect all problems; never writes anything.

    ``lesions`` picks the derivatives folder and ``desc-`` of the lesion maps of a BIDS root.

    ``on_subject`` is called with every subject that loads, so a caller can use the volumes while they are in
    memory (``prepare_cohort`` cuts the lesion patches then, instead of reading every NIfTI a second time).
    """
    from qsmrim.data.cohort import scan_cohort

    problems: list[Problem] = []
    try:
        if isinstance(source, Cohort):
            cohort = source
        else:
            cohort, problems = scan_cohort(source, lesions=lesions)
    except InputError as exc:
        return ValidationReport(0, tuple(exc.problems), None, ())
    rows: list[dict] = []
    spacings = []
    subjects = cohort.subjects
    if progress:
        from rich.progress import track

        subjects = track(subjects, description="validating", transient=True)  # type: ignore[assignment]
    for files in subjects:
        try:
            vol = load_subject(files)
        except InputError as exc:
            problems += exc.problems
            continue
        rows += lesion_rows(vol)
        spacings.append(vol.spacing)
        if on_subject is not None:
            on_subject(vol)
    table = _to_frame(rows) if not problems else None
    return ValidationReport(len(cohort), tuple(problems), table, tuple(spacings), tuple(s.subject for s in cohort.subjects))
