"""Two-channel lesion patches (DESIGN §4) and their memory-mappable cohort cache."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from qsmrim.atomic import atomic_path
from qsmrim.data.cohort import Cohort, SubjectVolumes, load_subject
from qsmrim.data.errors import InputError
from qsmrim.data.fingerprint import fingerprint

__all__ = ["PatchSpec", "brain_median", "extract_patches", "build_patch_cache", "load_patch_cache", "patch_cache_key",
           "patch_cache_is_current"]

log = logging.getLogger(__name__)

PATCH_CACHE_VERSION = 1
_MIN_FLAIR_MEDIAN = 1e-6
"""Smallest brain median FLAIR divides by: a denormal median (1e-38) made every patch infinite."""


@dataclass(frozen=True)
class PatchSpec:
    """Patch geometry: ``size`` in voxels as (z, y, x); channels are (QSM ppm, FLAIR / brain median)."""

    size: tuple[int, int, int] = (16, 32, 32)

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(int(s) <= 0 for s in self.size):
            raise ValueError(f"PatchSpec.size must be three positive ints (z, y, x), not {self.size!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, *self.size)


def brain_median(vol: SubjectVolumes) -> float:
    """Median FLAIR over brain voxels (QSM != 0: QSM maps are brain-masked)."""
    brain = vol.qsm != 0
    if not np.any(brain):
        raise InputError("QSM is zero everywhere: no brain voxels to normalise FLAIR by", where=f"sub-{vol.subject} QSM")
    med = float(np.median(vol.flair[brain]))
    if not (np.isfinite(med) and med >= _MIN_FLAIR_MEDIAN):
        raise InputError(
            f"FLAIR median over the brain is {med:g}; must be finite and at least {_MIN_FLAIR_MEDIAN:g} "
            "(FLAIR is divided by it)",
            where=f"sub-{vol.subject} FLAIR",
        )
    return med


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x) + 0.5).astype(np.int64)


def extract_patches(vol: SubjectVolumes, lesions: list[int] | None = None, spec: PatchSpec = PatchSpec()) -> np.ndarray:
    """Patches ``float32 [n, 2, *spec.size]`` for ``lesions`` (default: all, ascending).

    Each patch is centred on the lesion's centre of mass rounded half-up (voxel ``size // 2`` of the patch),
    keeps only the target lesion's voxels (other lesions and background are 0) and is zero-padded where it
    leaves the image.
    """
    lesions = vol.lesion_indices if lesions is None else list(lesions)
    out = np.zeros((len(lesions), *spec.shape), dtype=np.float32)
    if not lesions:
        return out
    qsm = vol.qsm.transpose(2, 1, 0)
    with np.errstate(over="ignore"):
        flair = vol.flair.transpose(2, 1, 0) / np.float32(brain_median(vol))
    inst = vol.instances.transpose(2, 1, 0)
    coms = ndimage.center_of_mass(np.ones_like(inst, dtype=np.float32), inst, lesions)
    size = np.array(spec.size)
    for n, (idx, com) in enumerate(zip(lesions, coms, strict=True)):
        if np.isnan(com[0]):
            raise InputError(f"lesion {idx} is not in the lesion map", where=f"sub-{vol.subject}")
        start = _round_half_up(com) - size // 2
        lo = np.maximum(start, 0)
        hi = np.minimum(start + size, inst.shape)
        src = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        mask = inst[src] == idx
        out[n, 0][dst] = np.where(mask, qsm[src], 0.0)
        out[n, 1][dst] = np.where(mask, flair[src], 0.0)
    bad = ~np.isfinite(out).all(axis=(1, 2, 3, 4))
    if bad.any():
        hit = [lesions[i] for i in np.flatnonzero(bad)]
        raise InputError(
            f"lesion(s) {hit[:20]}{' ...' if len(hit) > 20 else ''}: FLAIR divided by its brain median is "
            "beyond float32 range; the FLAIR intensities are not plausible",
            where=f"sub-{vol.subject} FLAIR",
        )
    return out


def _cache_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / "patches.npy", out_dir / "patches.json"


def patch_cache_key(cohort: Cohort, table: pd.DataFrame, spec: PatchSpec) -> str:
    """Content key of a patch cache: every input file, the lesion rows in order, the spec."""
    rows = table[["subject", "lesion"]].astype({"subject": str, "lesion": int}).values.tolist()
    return fingerprint(cohort.files(), asdict(spec), rows, PATCH_CACHE_VERSION)


def patch_cache_is_current(out_dir: str | Path, key: str) -> bool:
    """Whether ``out_dir`` holds a patch cache built for ``key``."""
    npy, meta = _cache_paths(Path(out_dir))
    if not (npy.exists() and meta.exists()):
        return False
    try:
        return json.loads(meta.read_text()).get("key") == key
    except (json.JSONDecodeError, OSError, ValueError):
        log.warning("ignoring unreadable patch cache %s", meta)
        return False


def build_patch_cache(
    cohort: Cohort,
    table: pd.DataFrame,
    out_dir: str | Path,
    spec: PatchSpec = PatchSpec(),
    *,
    progress: bool = False,
    prebuilt: dict[str, tuple[list[int], np.ndarray]] | None = None,
) -> np.ndarray:
    """Build (or reuse) ``out_dir/patches.npy``: one patch per row of ``table``, in its order.

    The cache key covers every input file's content, the lesion rows and ``spec``; a matching cache is
    memory-mapped read-only, anything else is rebuilt and written atomically. ``prebuilt`` maps a subject
    to ``(lesion indices, their patches)`` already cut with ``spec`` (while the volumes were loaded for
    validation); those subjects are not read again.
    """
    out_dir = Path(out_dir)
    npy, meta = _cache_paths(out_dir)
    rows = table[["subject", "lesion"]].astype({"subject": str, "lesion": int}).values.tolist()
    key = patch_cache_key(cohort, table, spec)
    if patch_cache_is_current(out_dir, key):
        log.info("patch cache hit: %s", npy)
        return np.load(npy, mmap_mode="r")
    prebuilt = prebuilt or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    by_subject = {s.subject: s for s in cohort.subjects}
    groups = table.reset_index(drop=True).groupby("subject", sort=False).indices
    items = list(groups.items())
    if progress:
        from rich.progress import track

        items = track(items, description="patches", transient=True)  # type: ignore[assignment]
    with atomic_path(npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows), *spec.shape))
        for subject, positions in items:
            if subject not in by_subject:
                raise InputError(f"subject {subject!r} of the lesion table is not in the cohort", where=str(cohort.source))
            lesions = table["lesion"].to_numpy()[positions].tolist()
            if subject in prebuilt and set(lesions) <= set(prebuilt[subject][0]):
                ids, cut = prebuilt[subject]
                where = {int(i): k for k, i in enumerate(ids)}
                arr[positions] = cut[[where[int(i)] for i in lesions]]
            else:
                arr[positions] = extract_patches(load_subject(by_subject[subject]), lesions, spec)
        arr.flush()
        del arr
    meta.write_text(json.dumps({"key": key, "n": len(rows), "spec": asdict(spec)}, indent=1))
    return np.load(npy, mmap_mode="r")


def load_patch_cache(out_dir: str | Path) -> np.ndarray:
    """Memory-map an existing ``patches.npy`` read-only."""
    npy, _ = _cache_paths(Path(out_dir))
    if not npy.exists():
        raise FileNotFoundError(f"{npy}: no patch cache; run `qsmrim patches ROOT --out {out_dir}` first")
    return np.load(npy, mmap_mode="r")
