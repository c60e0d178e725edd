"""BIDS names: the entities of a scan, its id, and the discovery of a BIDS root's scans.

A scan is the unit of work (one lesion table block, one features file, one prediction folder): the files of
one subject, session, acquisition, reconstruction and run. Its id is the entity string without the leading
``sub-`` (``01``, ``01_ses-02``, ``01_ses-02_acq-gre_run-1``), so ``f"sub-{scan_id}"`` is the prefix of every
file of the scan and a subject-only cohort keeps the ids it always had. The subject a scan belongs to is the
part before the first ``_`` (labels are alphanumeric), which is what folds group by.

Our own parser, not pybids: we read two suffixes and one derivative folder, pybids costs ~0.4 s to import and
~390 MB with its dependencies (SQLAlchemy, formulaic, the BIDS schema), and indexes the whole dataset into
SQLite before the first query. See docs/data.md.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qsmrim.data.errors import InputError, Problem

__all__ = [
    "ENTITIES",
    "LesionSource",
    "ScanFiles",
    "discover_bids_scans",
    "entities_of",
    "participant_of",
    "scan_folder",
    "scan_id",
    "session_of",
]

log = logging.getLogger(__name__)

ENTITIES: tuple[str, ...] = ("sub", "ses", "acq", "rec", "run")
"""The entities a scan's file names may carry, in BIDS order."""

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NIFTI = (".nii.gz", ".nii")
_IMAGE_SUFFIXES = ("Chimap", "FLAIR")


@dataclass(frozen=True)
class LesionSource:
    """Where lesion maps come from: a derivatives folder and the ``desc-`` label of its maps.

    ``folder`` is relative to the BIDS root (``derivatives/lesions``, ``derivatives/lst-ai``) or absolute (a
    derivatives dataset kept elsewhere). The folder holds ``sub-<label>[/ses-<label>]/anat/<scan>_desc-<desc>_
    dseg.nii[.gz]`` (instance labels 1..K) or ``..._desc-<desc>_mask.nii[.gz]`` (binary: instances are its
    26-connected components), and the rim labels in ``<scan>_desc-<desc>_dseg.tsv``.
    """

    folder: str = "derivatives/lesions"
    desc: str = "lesions"

    def __post_init__(self) -> None:
        if not str(self.folder).strip():
            raise InputError("must name a folder, e.g. derivatives/lesions", where="lesions_from")
        if not _LABEL.match(self.desc):
            raise InputError(f"desc label must be alphanumeric (BIDS), not {self.desc!r}", where="lesions_desc")

    def root(self, bids_root: Path) -> Path:
        """The derivatives folder for the dataset at ``bids_root``."""
        p = Path(self.folder)
        return p if p.is_absolute() else bids_root / p


@dataclass(frozen=True)
class ScanFiles:
    """One scan's files found by name (no image is read here); ``lesions_kind`` is ``dseg`` or ``mask``."""

    scan: str
    qsm: Path
    flair: Path
    lesions: Path
    labels: Path | None
    lesions_kind: str


def scan_id(entities: dict[str, str]) -> str:
    """``{"sub": "01", "ses": "02"}`` -> ``"01_ses-02"`` (entities in BIDS order; ``sub`` required)."""
    rest = [f"{k}-{entities[k]}" for k in ENTITIES[1:] if entities.get(k)]
    return "_".join([entities["sub"], *rest])


def entities_of(scan: str) -> dict[str, str]:
    """The entities of a scan id: ``"01_ses-02_run-1"`` -> ``{"sub": "01", "ses": "02", "run": "1"}``."""
    head, *rest = scan.split("_")
    out = {"sub": head}
    for part in rest:
        key, _, value = part.partition("-")
        out[key] = value
    return out


def participant_of(scan: str) -> str:
    """The subject label of a scan id (what folds group by): ``"01_ses-02"`` -> ``"01"``."""
    return scan.split("_", 1)[0]


def session_of(scan: str) -> str | None:
    """The session label of a scan id, or None for a subject-only scan."""
    return entities_of(scan).get("ses")


def scan_folder(scan: str) -> Path:
    """``sub-<label>[/ses-<label>]/anat``: where a scan's files sit in a BIDS (derivatives) dataset."""
    ent = entities_of(scan)
    folder = Path(f"sub-{ent['sub']}")
    if ent.get("ses"):
        folder /= f"ses-{ent['ses']}"
    return folder / "anat"


# -- discovery ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Named:
    """A NIfTI whose name parsed: its entities (without ``desc``), ``desc`` and suffix."""

    path: Path
    entities: dict[str, str]
    desc: str | None
    suffix: str

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple((k, self.entities[k]) for k in ENTITIES if k in self.entities)

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")


def _strip_nifti(name: str) -> str | None:
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _parse(path: Path, *, allow_desc: bool) -> _Named | Problem | None:
    """Entities, desc and suffix of a NIfTI name; None for a file that is not a NIfTI, a Problem for a bad name."""
    stem = _strip_nifti(path.name)
    if stem is None:
        return None
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    desc = None
    order = [*ENTITIES, "desc"] if allow_desc else list(ENTITIES)
    last = -1
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep or not _LABEL.match(value):
            return Problem(str(path), f"'{pair}' is not a BIDS entity (key-label, label alphanumeric)")
        if key not in order:
            allowed = ", ".join(f"{k}-" for k in order)
            return Problem(str(path), f"entity '{key}-' is not supported; a scan is named by {allowed}")
        if key == "run" and not value.isdigit():
            return Problem(str(path), f"run-{value}: a run is a non-negative integer index")
        if order.index(key) <= last:
            return Problem(str(path), f"entities out of BIDS order; expected the order {', '.join(order)}")
        last = order.index(key)
        if key == "desc":
            desc = value
        else:
            entities[key] = value
    if "sub" not in entities:
        return Problem(str(path), "file name does not start with sub-<label>")
    return _Named(path, entities, desc, suffix)


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _strip_nifti(p.name) is not None) if folder.is_dir() else []


def _anat_folders(sub_dir: Path) -> list[tuple[str | None, Path]]:
    """``(session label or None, anat folder)`` of a subject folder: ``anat/`` and every ``ses-*/anat/``."""
    out: list[tuple[str | None, Path]] = [(None, sub_dir / "anat")]
    for ses in sorted(p for p in sub_dir.iterdir() if p.is_dir() and p.name.startswith("ses-")):
        out.append((ses.name[len("ses-"):], ses / "anat"))
    return out


def _check_place(named: _Named, sub: str, ses: str | None) -> Problem | None:
    if named.entities["sub"] != sub:
        return Problem(str(named.path), f"file names subject sub-{named.entities['sub']} but sits in sub-{sub}/")
    if named.session != ses:
        where = f"ses-{ses}/" if ses else f"sub-{sub}/anat/ (no session folder)"
        has = f"ses-{named.session}" if named.session else "no ses- entity"
        return Problem(str(named.path), f"file has {has} but sits in {where}")
    return None


def discover_bids_scans(root: Path, lesions: LesionSource) -> tuple[list[ScanFiles], list[Problem]]:
    """Every complete scan of a BIDS root, sorted by scan id, and the problems of the others.

    A QSM (``_Chimap``) pairs with the FLAIR of the same entities; when none has them and its session holds
    exactly one QSM and one FLAIR, those two pair (a FLAIR named without the QSM's ``acq-``). The lesion map
    carries the QSM's (or the paired FLAIR's) entities. Anything that leaves a choice (two runs of a QSM and
    one FLAIR, a ``.nii`` beside a ``.nii.gz``, a dseg beside a mask) or a FLAIR no QSM claims is a problem
    naming the file.
    """
    sub_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-"))
    if not sub_dirs:
        raise InputError("not a BIDS root: no sub-<id> folders found (or pass a CSV manifest)", where=root)
    der_root = lesions.root(root)
    scans: list[ScanFiles] = []
    problems: list[Problem] = []
    for sub_dir in sub_dirs:
        sub = sub_dir.name[len("sub-"):]
        if not _LABEL.match(sub):
            problems.append(Problem(str(sub_dir), "subject folder must be sub-<alphanumeric label>"))
            continue
        found_any = False
        for ses, anat in _anat_folders(sub_dir):
            images: dict[str, list[_Named]] = {s: [] for s in _IMAGE_SUFFIXES}
            for path in _niftis(anat):
                named = _parse(path, allow_desc=False)
                if named is None:
                    continue
                if isinstance(named, Problem):
                    if any(path.name.endswith(f"_{s}{e}") for s in _IMAGE_SUFFIXES for e in _NIFTI):
                        problems.append(named)
                    continue
                if named.suffix not in images:
                    continue
                if (bad := _check_place(named, sub, ses)) is not None:
                    problems.append(bad)
                    continue
                images[named.suffix].append(named)
            if not (images["Chimap"] or images["FLAIR"]):
                continue
            found_any = True
            s, p = _session_scans(anat, sub, ses, images, der_root, lesions)
            scans += s
            problems += p
        if not found_any:
            anat = sub_dir / "anat"
            problems.append(Problem(str(anat / f"{sub_dir.name}_Chimap.nii.gz"), "missing QSM (Chimap) image"))
            problems.append(Problem(str(anat / f"{sub_dir.name}_FLAIR.nii.gz"), "missing FLAIR image"))
    return sorted(scans, key=lambda s: s.scan), problems


def _one_per_key(items: list[_Named], problems: list[Problem]) -> dict[tuple, _Named]:
    """Group by entities; a ``.nii`` beside a ``.nii.gz`` of the same name is a choice we refuse to make."""
    by_key: dict[tuple, list[_Named]] = {}
    for it in items:
        by_key.setdefault((it.key, it.desc, it.suffix), []).append(it)
    out = {}
    for key, group in by_key.items():
        if len(group) > 1:
            names = ", ".join(g.path.name for g in group)
            problems.append(Problem(str(group[0].path.parent), f"{names} are the same image twice; keep one"))
            continue
        out[key[0]] = group[0]
    return out


def _session_scans(anat: Path, sub: str, ses: str | None, images: dict[str, list[_Named]],
                   der_root: Path, lesions: LesionSource) -> tuple[list[ScanFiles], list[Problem]]:  # fmt: skip
    problems: list[Problem] = []
    qsms = _one_per_key(images["Chimap"], problems)
    flairs = _one_per_key(images["FLAIR"], problems)
    claimed: set[tuple] = set()
    pairs: list[tuple[_Named, _Named]] = []
    for key, qsm in sorted(qsms.items()):
        if key in flairs:
            pairs.append((qsm, flairs[key]))
            claimed.add(key)
    unpaired_q = [q for k, q in sorted(qsms.items()) if k not in claimed]
    unpaired_f = [f for k, f in sorted(flairs.items()) if k not in claimed]
    if len(unpaired_q) == 1 and len(unpaired_f) == 1 and len(qsms) == 1 and len(flairs) == 1:
        q, f = unpaired_q[0], unpaired_f[0]
        log.info("%s: paired with %s (the session's only QSM and FLAIR)", q.path, f.path.name)
        pairs.append((q, f))
        unpaired_q, unpaired_f = [], []
    for q in unpaired_q:
        expected = anat / f"{q.path.name[: -len(_ext(q.path.name))].removesuffix('_Chimap')}_FLAIR.nii.gz"
        if unpaired_f:
            names = ", ".join(f.path.name for f in unpaired_f)
            problems.append(Problem(str(q.path), f"no FLAIR with the same entities, and {len(unpaired_f)} other "
                                                 f"FLAIR(s) ({names}) leave a choice; name the FLAIR {expected.name}"))
        else:
            problems.append(Problem(str(expected), "missing FLAIR image"))
    for f in unpaired_f:
        expected = f.path.name[: -len(_ext(f.path.name))].removesuffix("_FLAIR") + "_Chimap.nii.gz"
        problems.append(Problem(str(f.path), f"FLAIR without a QSM of the same entities ({expected}): missing QSM "
                                             "(Chimap) image"))

    der_anat = der_root / f"sub-{sub}" / (f"ses-{ses}/anat" if ses else "anat")
    maps: list[_Named] = []
    unreadable: list[str] = []  # maps of this desc whose names do not parse (e.g. a space- entity)
    for path in _niftis(der_anat):
        named = _parse(path, allow_desc=True)
        if isinstance(named, _Named) and named.desc == lesions.desc and named.suffix in ("dseg", "mask"):
            maps.append(named)
        elif isinstance(named, Problem) and f"_desc-{lesions.desc}_" in path.name:
            unreadable.append(f"{path.name} ({named.what})")
    by_key: dict[tuple, list[_Named]] = {}
    for m in maps:
        by_key.setdefault(m.key, []).append(m)

    scans: list[ScanFiles] = []
    claimed_maps = {k for q, f in pairs for k in (q.key, f.key) if k in by_key}
    for qsm, flair in pairs:
        sid = scan_id(qsm.entities)
        prefix = f"sub-{sid}"
        candidates = by_key.get(qsm.key) or by_key.get(flair.key) or []
        dsegs = [m for m in candidates if m.suffix == "dseg"]
        masks = [m for m in candidates if m.suffix == "mask"]
        if len(dsegs) > 1 or len(masks) > 1:
            names = ", ".join(m.path.name for m in candidates)
            problems.append(Problem(str(der_anat), f"{names}: the same lesion map twice; keep one"))
            continue
        if not candidates:
            others = sorted(m.path.name for m in maps if m.key not in claimed_maps) + unreadable
            hint = f"; the folder holds {', '.join(others[:3])}, not named for this scan" if others else ""
            problems.append(Problem(str(der_anat / f"{prefix}_desc-{lesions.desc}_dseg.nii.gz"),
                                    f"missing lesion map (dseg or mask){hint}"))  # fmt: skip
            continue
        if dsegs and masks:
            problems.append(Problem(str(der_anat), f"both a lesion dseg and a lesion mask for {prefix}; keep one"))
            continue
        lesion_map = (dsegs or masks)[0]
        stem = lesion_map.path.name[: -len(_ext(lesion_map.path.name))]
        tsv = der_anat / f"{stem.removesuffix('_mask').removesuffix('_dseg')}_dseg.tsv"
        scans.append(ScanFiles(sid, qsm.path, flair.path, lesion_map.path, tsv if tsv.exists() else None,
                               lesion_map.suffix))  # fmt: skip
    return scans, problems


def _ext(name: str) -> str:
    return next(e for e in _NIFTI if name.endswith(e))
