"""Find a cohort's files (BIDS root or CSV manifest) and load one subject's validated volumes.

Discovery only looks at file names; :func:`load_subject` reads the images and checks everything DESIGN §3
asks for. Both collect every problem they find and raise one :class:`InputError` listing them all, so a
user fixes a cohort in one pass, not one error at a time.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from qsmrim.data.bids import LesionSource, discover_bids_scans, entities_of, participant_of, session_of
from qsmrim.data.errors import InputError, Problem
from qsmrim.data.nifti_io import CanonicalImage, NiftiLimits, read_canonical

__all__ = [
    "Cohort",
    "SubjectFiles",
    "SubjectVolumes",
    "discover_cohort",
    "scan_cohort",
    "load_subject",
    "read_labels",
    "GRID_TOLERANCE_MM",
    "MAX_LESION_INDEX",
    "compact_instances",
    "lesion_instances",
]

GRID_TOLERANCE_MM = 1e-3
"""Largest difference of affine entries (mm) for two images to count as one grid (DESIGN §3)."""

MAX_LESION_INDEX = 2**31 - 1
"""Largest lesion index a dseg map may hold (int32); maps are read as integers, never through float32."""

MAX_PROBLEMS_PER_FILE = 50
"""Bad rows of one label TSV reported one by one; the rest are counted."""

_RIM_VALUES = {"1": 1, "0": 0, "n/a": None}
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_MANIFEST_COLUMNS = ("subject", "qsm", "flair", "lesions")


@dataclass(frozen=True)
class SubjectFiles:
    """Paths of one scan's inputs; ``lesions_kind`` is ``"dseg"`` (instances) or ``"mask"`` (binary).

    ``subject`` is the scan id (:mod:`qsmrim.data.bids`): the subject label for a subject-only cohort, else
    the entity string after ``sub-`` (``01_ses-02``), so ``f"sub-{subject}"`` prefixes the scan's files.
    """

    subject: str
    qsm: Path
    flair: Path
    lesions: Path
    labels: Path | None = None
    lesions_kind: str = "dseg"

    @property
    def participant(self) -> str:
        """The subject label (what folds group by)."""
        return participant_of(self.subject)

    @property
    def session(self) -> str | None:
        """The session label, or None."""
        return session_of(self.subject)

    @property
    def entities(self) -> dict[str, str]:
        """The scan's BIDS entities (``sub``, and ``ses``/``acq``/``rec``/``run`` when present)."""
        return entities_of(self.subject)


@dataclass(frozen=True)
class Cohort:
    """The subjects of a dataset, sorted by id; ``source`` is the BIDS root or the manifest."""

    source: Path
    subjects: tuple[SubjectFiles, ...]

    def __len__(self) -> int:
        return len(self.subjects)

    def files(self) -> list[Path]:
        """Every input file, in a stable order (used for cache keys)."""
        out: list[Path] = []
        for s in self.subjects:
            out += [s.qsm, s.flair, s.lesions] + ([s.labels] if s.labels else [])
        return out


@dataclass(frozen=True)
class SubjectVolumes:
    """One subject in RAS+ voxel order (arrays indexed ``[x, y, z]``), validated."""

    subject: str
    qsm: np.ndarray
    flair: np.ndarray
    instances: np.ndarray
    affine: np.ndarray
    labels: dict[int, int | None] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along x, y, z."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def lesion_indices(self) -> list[int]:
        """Lesion instance indices present in the map, ascending."""
        return [int(i) for i in np.unique(self.instances) if i != 0]


def discover_cohort(source: str | Path, *, lesions: LesionSource | None = None) -> Cohort:
    """Return the cohort at a BIDS root or in a CSV manifest (``subject[,session],qsm,flair,lesions[,labels]``).

    ``lesions`` says which derivatives folder and ``desc-`` hold the lesion maps (default
    ``derivatives/lesions``, ``desc-lesions``). Raises :class:`InputError` listing every missing file,
    ambiguous name, duplicate scan or malformed manifest row.
    """
    cohort, problems = scan_cohort(source, lesions=lesions)
    if problems:
        raise InputError(problems)
    return cohort


def scan_cohort(source: str | Path, *, lesions: LesionSource | None = None) -> tuple[Cohort, list[Problem]]:
    """Like :func:`discover_cohort`, but return the complete subjects together with the problems found.

    Raises :class:`InputError` only when ``source`` itself is unusable (missing, not a BIDS root, not a CSV).
    """
    source = Path(source)
    if not source.exists():
        raise InputError("no such file or directory", where=source)
    if source.is_file():
        return _discover_manifest(source)
    return _discover_bids(source, lesions or LesionSource())


def _discover_bids(root: Path, lesions: LesionSource) -> tuple[Cohort, list[Problem]]:
    scans, problems = discover_bids_scans(root, lesions)
    subjects = [SubjectFiles(s.scan, s.qsm, s.flair, s.lesions, s.labels, s.lesions_kind) for s in scans]
    return Cohort(source=root, subjects=tuple(subjects)), problems


def _discover_manifest(path: Path) -> tuple[Cohort, list[Problem]]:
    problems: list[Problem] = []
    subjects: list[SubjectFiles] = []
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            missing = [c for c in _MANIFEST_COLUMNS if c not in cols]
            if missing:
                raise InputError(f"manifest lacks column(s) {', '.join(missing)}; need {','.join(_MANIFEST_COLUMNS)}[,labels]", where=path)
            rows = list(reader)
    except UnicodeDecodeError:
        raise InputError("manifest is not a UTF-8 CSV file", where=path) from None
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        where = f"{path}:{n}"
        sid = (row.get("subject") or "").strip().removeprefix("sub-")
        if not sid:
            problems.append(Problem(where, "empty subject"))
            continue
        ses = (row.get("session") or "").strip().removeprefix("ses-")
        # ids become file and folder names (qsmrim predict writes sub-<id>/): letters and digits only
        if not _LABEL_RE.match(sid) or (ses and not _LABEL_RE.match(ses)):
            what = f"subject {sid!r} and session {ses!r} must be" if ses else f"subject {sid!r} must be an"
            problems.append(Problem(where, f"{what} alphanumeric label{'s' if ses else ''} ([A-Za-z0-9]+)"))
            continue
        if ses:
            sid = f"{sid}_ses-{ses}"
        if sid in seen:
            what = f"subject {sid.split('_')[0]!r} session {ses!r}" if ses else f"subject {sid!r}"
            problems.append(Problem(where, f"duplicate {what}"))
            continue
        seen.add(sid)

        def _path(col: str, *, _row: dict = row, _where: str = where) -> Path | None:
            val = (_row.get(col) or "").strip()
            if not val:
                return None
            p = Path(val) if Path(val).is_absolute() else path.parent / val
            if not p.exists():
                problems.append(Problem(str(p), f"{col} file not found (manifest {_where})"))
                return None
            return p

        qsm, flair, lesions, labels = _path("qsm"), _path("flair"), _path("lesions"), _path("labels")
        for col, val in (("qsm", qsm), ("flair", flair), ("lesions", lesions)):
            if val is None and not (row.get(col) or "").strip():
                problems.append(Problem(where, f"empty {col} path"))
        if qsm and flair and lesions:
            kind = "mask" if "_mask" in lesions.name else "dseg"
            subjects.append(SubjectFiles(sid, qsm, flair, lesions, labels, kind))
    if not rows:
        problems.append(Problem(str(path), "manifest has no rows"))
    return Cohort(source=path, subjects=tuple(sorted(subjects, key=lambda s: s.subject))), problems


def read_labels(path: Path) -> tuple[dict[int, int | None], list[Problem]]:
    """Parse a lesion TSV (columns ``index``, ``rim`` in {1, 0, n/a}); return labels and problems."""
    problems: list[Problem] = []
    labels: dict[int, int | None] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's UTF-8 BOM is not part of "index"
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [Problem(str(path), f"unreadable label TSV ({exc})")]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}, [Problem(str(path), "empty label TSV; need columns index, rim")]
    header = [h.strip() for h in lines[0].split("\t")]
    if "index" not in header or "rim" not in header:
        return {}, [Problem(str(path), f"label TSV needs columns 'index' and 'rim', found {header}")]
    i_idx, i_rim = header.index("index"), header.index("rim")
    for n, ln in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in ln.split("\t")]
        if len(cells) != len(header):
            problems.append(Problem(f"{path}:{n}", f"expected {len(header)} tab-separated cells, got {len(cells)}"))
            continue
        try:
            idx = int(cells[i_idx])
            if idx <= 0:
                raise ValueError
        except ValueError:
            problems.append(Problem(f"{path}:{n}", f"index must be a positive integer, got {cells[i_idx]!r}"))
            continue
        rim = cells[i_rim].lower()
        if rim not in _RIM_VALUES:
            problems.append(Problem(f"{path}:{n}", f"rim value {cells[i_rim]!r} for lesion {idx} not in {{0, 1, n/a}}"))
            continue
        if idx in labels:
            problems.append(Problem(f"{path}:{n}", f"lesion {idx} labelled twice"))
            continue
        labels[idx] = _RIM_VALUES[rim]
    if len(problems) > MAX_PROBLEMS_PER_FILE:
        more = len(problems) - MAX_PROBLEMS_PER_FILE
        problems = problems[:MAX_PROBLEMS_PER_FILE] + [Problem(str(path), f"... and {more} more bad row(s)")]
    return labels, problems


def _some(values: list[int], n: int = 20) -> str:
    """``values`` for a message: the first ``n``, then how many more (a hostile map may hold 10^5 lesions)."""
    return str(values) if len(values) <= n else f"{values[:n]} and {len(values) - n} more"


def _same_grid(a: CanonicalImage, b: CanonicalImage) -> str | None:
    if a.data.shape != b.data.shape:
        return f"shape {b.data.shape} differs from QSM shape {a.data.shape}"
    if not np.allclose(a.affine, b.affine, atol=GRID_TOLERANCE_MM, rtol=0):
        diff = float(np.abs(a.affine - b.affine).max())
        return f"affine differs from the QSM affine by {diff:.4g} mm (tolerance {GRID_TOLERANCE_MM} mm)"
    return None


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Lesion instances of a binary mask: 26-connected components, numbered in RAS+ raster order."""
    labelled, _ = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), dtype=bool))
    return labelled.astype(np.int32)


def compact_instances(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lesion map relabelled ``0..K`` (ascending original index) and the original index of each label.

    Returns ``(compact, indices)`` with ``indices[0] == 0`` and ``instances == indices[compact]``.
    ``np.bincount`` and ``ndimage.find_objects`` allocate by the largest label, so code that sizes arrays by
    label runs on ``compact``: one lesion labelled 10^8 costs what one labelled 1 costs. A map already
    numbered ``0..K`` is returned as is.
    """
    flat = instances.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= max(flat.size, 2**16):  # look-up tables no larger than the map itself
        seen = np.zeros(top + 1, dtype=bool)
        seen[flat] = True
        seen[0] = True
        indices = np.flatnonzero(seen)
        if len(indices) == top + 1:
            return instances, indices
        lut = np.zeros(top + 1, dtype=np.int32)
        lut[indices] = np.arange(len(indices), dtype=np.int32)
        return lut[instances], indices
    indices = np.unique(flat)
    if indices[0] != 0:
        indices = np.concatenate([[0], indices])
    return np.searchsorted(indices, instances).astype(np.int32), indices


def lesion_instances(raw: np.ndarray, kind: str, where: str) -> np.ndarray:
    """Integer lesion instances of a dseg or mask read in its stored type; refuse what is not an index."""
    with np.errstate(invalid="ignore"):
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            raise InputError("lesion map holds NaN or infinite values; it must hold non-negative integers", where=where)
        bad = raw[(raw < 0) | (raw != np.round(raw))] if raw.dtype.kind == "f" else raw[raw < 0]
    if bad.size:
        raise InputError(
            f"lesion map must hold non-negative integers (0 = background), found {bad.flat[0].item()!r}", where=where
        )
    top = raw.max() if raw.size else 0
    if top > MAX_LESION_INDEX:
        raise InputError(
            f"lesion index {int(top) if np.isfinite(top) else top} is above the largest supported index "
            f"{MAX_LESION_INDEX} (2^31 - 1); renumber the lesions 1..K",
            where=where,
        )
    if kind == "mask":
        if top > 1:
            raise InputError("a lesion mask must be binary (0/1); use a _dseg file for instance labels", where=where)
        return instances_from_mask(raw)
    return raw.astype(np.int32)


def load_subject(
    files: SubjectFiles, *, require_labels: bool = False, limits: NiftiLimits | None = None
) -> SubjectVolumes:
    """Read one subject, reoriented to RAS+, and check it against DESIGN §3.

    Checks: readable 3-D images on one grid, a non-empty integer lesion map, finite QSM and FLAIR inside
    every lesion, and a label TSV that names exactly the lesions in the map. Non-finite voxels outside
    lesions are set to 0 (QSM maps are brain-masked, so background can carry NaN). Each image is read
    within ``limits`` (:class:`~qsmrim.data.nifti_io.NiftiLimits`); the lesion map is read in its stored
    integer type, so indices above 2^24 keep their value.
    """
    limits = limits or NiftiLimits()
    problems: list[Problem] = []
    images: dict[str, CanonicalImage] = {}
    for key, path in (("qsm", files.qsm), ("flair", files.flair), ("lesions", files.lesions)):
        try:
            images[key] = read_canonical(path, dtype=None if key == "lesions" else np.float32, limits=limits)
        except InputError as exc:
            problems += exc.problems
    if "qsm" in images:
        for key in ("flair", "lesions"):
            if key in images and (msg := _same_grid(images["qsm"], images[key])):
                problems.append(Problem(str(images[key].path), msg))
    if problems:
        raise InputError(problems)

    lesion_path = str(files.lesions)
    instances = lesion_instances(images.pop("lesions").data, files.lesions_kind, lesion_path)
    present = [int(i) for i in np.unique(instances) if i != 0]
    if not present:
        raise InputError("empty lesion map: no lesion voxels", where=lesion_path)

    qsm, flair = images["qsm"].data, images["flair"].data
    in_lesion = instances > 0
    for key, arr in (("qsm", qsm), ("flair", flair)):
        bad = ~np.isfinite(arr)
        if np.any(bad & in_lesion):
            hit = [int(i) for i in np.unique(instances[bad & in_lesion])]
            problems.append(Problem(str(images[key].path), f"non-finite voxels inside lesion(s) {_some(hit)}"))
        elif np.any(bad):
            arr[bad] = 0.0

    labels: dict[int, int | None] = {}
    if files.labels is not None:
        labels, label_problems = read_labels(files.labels)
        problems += label_problems
        missing_lesions = sorted(set(labels) - set(present))
        if missing_lesions:
            problems.append(Problem(str(files.labels), f"label(s) for lesion(s) not in the map: {_some(missing_lesions)}"))
        unlabelled = sorted(set(present) - set(labels))
        if unlabelled and not label_problems:
            problems.append(Problem(str(files.labels), f"lesion(s) without a label: {_some(unlabelled)}"))
    elif require_labels:
        problems.append(Problem(str(files.lesions), "no label TSV (_desc-lesions_dseg.tsv) beside the lesion map"))
    if problems:
        raise InputError(problems)
    return SubjectVolumes(
        subject=files.subject,
        qsm=qsm,
        flair=flair,
        instances=instances,
        affine=images["qsm"].affine,
        labels={i: labels.get(i) for i in present},
    )
