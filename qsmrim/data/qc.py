"""QSM input quality control before classification: is this QSM plausible, and do the lesions fit the model?

A model trained on QSM in ppm answers nonsense, silently, for a map in ppb, Hz or radians, for a raw phase
image, for a FLAIR that is not registered to the QSM, or for lesions its 32 x 32 x 16 patch crops. Each
check here measures one number per subject and compares it with a named limit of :class:`QCConfig`; the
report travels with the predictions (``qc_*`` fields of the HTTP answer, the derivatives TSV and the QC
JSON sidecar). The caller's policy decides what a flag does: ``warn`` (default) answers and reports it,
``strict`` refuses the subject (:func:`enforce_qc`).

Checks (one flag each, so a single cause trips a single flag):

* ``qc_units``: p1..p99 span of the brain QSM. A ppm map of brain tissue spans about 0.1-0.5; ppb is 1000x,
  Hz about 128x (3 T), wrapped phase about 6.3 rad, raw phase thousands of integer steps.
* ``qc_brain_holes``: share of zero voxels inside the brain (the filled QSM mask). Non-finite voxels were set
  to 0 by :func:`qsmrim.data.load_subject`, so this counts them too.
* ``qc_range``: the most extreme brain value, as a multiple of the p1..p99 span away from the median. Scale-
  free on purpose: a unit error moves every value and trips ``qc_units`` only; a few absurd voxels trip this.
* ``qc_flair_contrast``: mean lesion FLAIR over the brain median FLAIR. Lesion masks are drawn on FLAIR, where
  lesions are hyperintense; near 1 or below means the FLAIR (or the lesion map) is not on the QSM grid.
* ``qc_cropped``: lesions with voxels outside their patch (the window :func:`qsmrim.data.extract_patches`
  takes around the rounded centre of mass): the model never sees part of them.
* ``qc_confluent``: share of lesions touching another lesion (26-neighbourhood): the patch masks the neighbour
  out, so a shared rim is cut. Confluent lesions are ordinary MS anatomy (8-60 % of the synthetic cohort's
  lesions touch one), so every one is marked per lesion and the subject is flagged only when most lesions
  touch: a lesion map that splits plaques into pieces, where patches cut rims systematically.

Pure NumPy/SciPy (science layer).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from qsmrim.data.cohort import SubjectVolumes
from qsmrim.data.errors import InputError, Problem

__all__ = [
    "QC_CHECKS",
    "QC_POLICIES",
    "QCCheck",
    "QCConfig",
    "QCPolicy",
    "QCReport",
    "enforce_qc",
    "run_qc",
]

log = logging.getLogger(__name__)

QCPolicy = Literal["warn", "strict"]
QC_POLICIES: tuple[str, ...] = ("warn", "strict")
QC_CHECKS: tuple[str, ...] = (
    "qc_units", "qc_brain_holes", "qc_range", "qc_flair_contrast", "qc_cropped", "qc_confluent",
)  # fmt: skip
"""Names of the checks, in report order; also the ``qc_*`` fields of every answer."""

_TYPICAL_PPM_SPAN = 0.35
"""p1..p99 span of a typical in-vivo brain QSM in ppm, used only to say how far off a unit looks."""


@dataclass(frozen=True)
class QCConfig:
    """Named limits of the QC checks (see the module docstring for what each measures).

    Args:
        percentiles: brain percentiles whose span is the robust scale of the QSM (``qc_units``, ``qc_range``).
        min_span_ppm, max_span_ppm: plausible p1..p99 span of a brain QSM in ppm. Synthetic cohort: 0.18-0.23.
        max_hole_share: largest share of zero (or non-finite) voxels inside the brain.
        max_extreme_ratio: largest ``max |QSM - median| / span`` over the brain. Synthetic cohort: about 1-2.
        min_flair_ratio: smallest mean lesion FLAIR / brain median FLAIR. Synthetic cohort: about 1.6-1.8.
        max_cropped: lesions allowed to extend beyond the patch (each one is also marked per lesion).
        max_confluent_share: largest share of lesions touching another (each one is marked per lesion).
            Synthetic cohort: 0.08-0.60.
        patch_size: the model's patch (z, y, x) in voxels.
    """

    percentiles: tuple[float, float] = (1.0, 99.0)
    min_span_ppm: float = 0.02
    max_span_ppm: float = 1.5
    max_hole_share: float = 0.01
    max_extreme_ratio: float = 25.0
    min_flair_ratio: float = 1.1
    max_cropped: int = 0
    max_confluent_share: float = 0.75
    patch_size: tuple[int, int, int] = (16, 32, 32)

    def __post_init__(self) -> None:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(
                f"QCConfig.percentiles must satisfy 0 <= low < high <= 100, not {self.percentiles}"
            )
        if not 0 < self.min_span_ppm < self.max_span_ppm:
            raise ValueError(
                f"QCConfig needs 0 < min_span_ppm < max_span_ppm, not {self.min_span_ppm}, {self.max_span_ppm}"
            )
        if len(self.patch_size) != 3 or any(int(s) <= 0 for s in self.patch_size):
            raise ValueError(
                f"QCConfig.patch_size must be three positive ints (z, y, x), not {self.patch_size}"
            )


@dataclass(frozen=True)
class QCCheck:
    """One check: its measured ``value``, the ``limit`` it was held to, whether it is ``flagged``, and why."""

    name: str
    value: float | None
    limit: str
    flagged: bool
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers become None)."""
        return {
            "value": _finite_or_none(self.value),
            "limit": self.limit,
            "flag": self.flagged,
            "message": self.message,
            **{k: _json_ready(v) for k, v in self.detail.items()},
        }


@dataclass(frozen=True)
class QCReport:
    """Every check of one subject, plus the lesions the per-lesion checks name."""

    checks: tuple[QCCheck, ...]
    cropped_lesions: tuple[int, ...] = ()
    confluent_lesions: tuple[int, ...] = ()

    @property
    def flags(self) -> list[str]:
        """Names of the flagged checks, in report order."""
        return [c.name for c in self.checks if c.flagged]

    def __getitem__(self, name: str) -> QCCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no QC check {name!r}; the checks are {list(QC_CHECKS)}")

    def as_dict(self, policy: QCPolicy = "warn") -> dict[str, Any]:
        """``{"policy", "passed", "flags", "qc_units": {...}, ...}`` for the HTTP answer and the JSON sidecar."""
        return {
            "policy": policy,
            "passed": not self.flags,
            "flags": self.flags,
            **{c.name: c.as_dict() for c in self.checks},
        }

    def problems(self, where: str) -> list[Problem]:
        """One :class:`Problem` per flagged check, naming the check, its value and its limit."""
        return [
            Problem(where, f"{c.name} = {_fmt(c.value)} (limit {c.limit}): {c.message}")
            for c in self.checks
            if c.flagged
        ]


def run_qc(vol: SubjectVolumes, config: QCConfig = QCConfig()) -> QCReport:
    """All checks of one validated subject (RAS+ arrays as :func:`qsmrim.data.load_subject` returns them).

    Never raises for implausible data: that is what it reports.
    """
    brain = vol.qsm != 0
    values = vol.qsm[brain & np.isfinite(vol.qsm)].astype(np.float64)
    cropped = _cropped_lesions(vol.instances, config.patch_size)
    confluent = _confluent_lesions(vol.instances)
    checks = (
        _units(values, config),
        _holes(vol.qsm, config),
        _extremes(values, config),
        _flair_contrast(vol, brain, config),
        _count_check("qc_cropped", cropped, config.max_cropped,
                     f"lesion(s) extend beyond the {'x'.join(map(str, config.patch_size[::-1]))} (x, y, z) patch "
                     "around their centre: the model sees them cropped"),
        _confluent_check(confluent, len(np.unique(vol.instances[vol.instances > 0])), config.max_confluent_share),
    )  # fmt: skip
    report = QCReport(checks, tuple(cropped), tuple(confluent))
    if report.flags:
        log.info("sub-%s QC flags: %s", vol.subject, ", ".join(report.flags))
    return report


def enforce_qc(report: QCReport, policy: QCPolicy, where: str, setting: str = "--qc strict") -> None:
    """Raise :class:`InputError` naming each flagged check when ``policy`` is ``strict``; else do nothing.

    ``setting`` names how the operator chose strict (the CLI flag or the ``qc: strict`` of a config), so the
    message says what to change to let the subject through.
    """
    if policy not in QC_POLICIES:
        raise ValueError(f"QC policy must be one of {list(QC_POLICIES)}, not {policy!r}")
    if policy != "strict" or not report.flags:
        return
    raise InputError(
        [Problem(p.where, f"{p.what}; refused by {setting} (use warn to predict anyway)")
         for p in report.problems(where)]
    )  # fmt: skip


# -- checks -----------------------------------------------------------------------------------------------


def _units(values: np.ndarray, config: QCConfig) -> QCCheck:
    limit = f"{config.min_span_ppm:g}..{config.max_span_ppm:g} ppm (p{config.percentiles[0]:g}..p{config.percentiles[1]:g} span)"
    if values.size == 0:
        return QCCheck("qc_units", None, limit, True, "no non-zero QSM voxels: the map is empty or not a QSM")
    p_lo, p_hi = (float(v) for v in np.percentile(values, config.percentiles))
    span = p_hi - p_lo
    detail = {"p_low": p_lo, "p_high": p_hi, "guess": _unit_guess(values, span, config)}
    ok = config.min_span_ppm <= span <= config.max_span_ppm
    if ok:
        msg = "brain QSM spans a plausible range for ppm"
    elif span < config.min_span_ppm:
        msg = f"brain QSM spans {_fmt(span)}, too narrow for ppm: {detail['guess']}?"
    else:
        msg = (f"brain QSM spans {_fmt(span)}, about {span / _TYPICAL_PPM_SPAN:.0f}x a typical ppm map: "
               f"looks like {detail['guess']}, not ppm")  # fmt: skip
    return QCCheck("qc_units", span, limit, not ok, msg, detail)


def _unit_guess(values: np.ndarray, span: float, config: QCConfig) -> str:
    if config.min_span_ppm <= span <= config.max_span_ppm:
        return "ppm"
    if span < config.min_span_ppm:
        return "SI units (ppm x 1e-6) or a constant map"
    if np.all(values == np.round(values)):
        return "a raw phase image (integer scanner units)"
    if float(np.max(np.abs(values))) <= math.pi * 1.01 and span > 2.0:
        return "a phase image in radians"
    return "ppb (x1000) or a field map in Hz (x~128 at 3 T)"


def _holes(qsm: np.ndarray, config: QCConfig) -> QCCheck:
    limit = f"<= {config.max_hole_share:g} of brain voxels"
    box = _bounding_box(qsm != 0, margin=1)  # the volume outside the brain's box is background: skip it
    if box is None:
        return QCCheck("qc_brain_holes", None, limit, False, "no brain voxels (see qc_units)")
    mask = qsm[box] != 0
    # holes slice by slice (in-plane 4-connectivity): a zero gap is a hole when its own slice encloses it, even if
    # it reaches the brain's surface through another slice; this includes every hole the 3-D mask encloses.
    # One z-padded call does all slices: the pad slices lie on the border, so no slice sees another's outside.
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, 1, 1] = in_plane[1, :, 1] = True
    filled = ndimage.binary_fill_holes(np.pad(mask, ((0, 0), (0, 0), (1, 1))), structure=in_plane)[:, :, 1:-1]
    n_brain = int(filled.sum())
    holes = int(n_brain - mask[filled].sum())
    share = holes / n_brain
    flagged = share > config.max_hole_share
    msg = (f"{holes} zero or non-finite voxels inside the brain ({share:.1%}): a masking or reconstruction "
           "failure, or non-finite values replaced by 0" if flagged else "no sizeable holes inside the brain")  # fmt: skip
    return QCCheck("qc_brain_holes", share, limit, flagged, msg, {"voxels": holes, "brain_voxels": n_brain})


def _extremes(values: np.ndarray, config: QCConfig) -> QCCheck:
    limit = f"<= {config.max_extreme_ratio:g} spans from the median"
    if values.size == 0:
        return QCCheck("qc_range", None, limit, False, "no brain voxels (see qc_units)")
    p_lo, med, p_hi = (
        float(v) for v in np.percentile(values, (config.percentiles[0], 50, config.percentiles[1]))
    )
    span = p_hi - p_lo
    lo, hi = float(values.min()), float(values.max())
    detail = {"min": lo, "max": hi}
    if span <= 0:
        return QCCheck("qc_range", None, limit, False, "no spread to compare with (see qc_units)", detail)
    ratio = max(hi - med, med - lo) / span
    flagged = ratio > config.max_extreme_ratio
    msg = (f"brain QSM reaches {_fmt(lo)}..{_fmt(hi)}, {ratio:.0f} spans from its median: implausible values "
           "(artefact, bad scaling or corrupt voxels)" if flagged else "no implausible extremes")  # fmt: skip
    return QCCheck("qc_range", ratio, limit, flagged, msg, detail)


def _flair_contrast(vol: SubjectVolumes, brain: np.ndarray, config: QCConfig) -> QCCheck:
    limit = f">= {config.min_flair_ratio:g} x brain median"
    flair = vol.flair
    if not brain.any():
        return QCCheck("qc_flair_contrast", None, limit, False, "no brain voxels (see qc_units)")
    med = float(np.median(flair[brain]))
    in_lesion = vol.instances > 0
    # per-lesion means over lesion voxels only, sized by the number of lesions (never by the largest index)
    index_of, inverse = np.unique(vol.instances[in_lesion], return_inverse=True)
    if med <= 0 or index_of.size == 0:
        return QCCheck("qc_flair_contrast", None, limit, False, "FLAIR brain median is not positive")
    sums = np.bincount(inverse, weights=flair[in_lesion].astype(np.float64))
    per_lesion = sums / np.bincount(inverse) / med
    ratio = float(per_lesion.mean())
    flagged = ratio < config.min_flair_ratio
    below = [int(i) for i, r in zip(index_of, per_lesion, strict=True) if r < 1.0]
    msg = (f"lesions are not FLAIR-hyperintense on average ({ratio:.2f} x brain median; {len(below)} of "
           f"{index_of.size} below 1): the FLAIR or the lesion map is probably not registered to the QSM"
           if flagged else "lesions are FLAIR-hyperintense")  # fmt: skip
    return QCCheck("qc_flair_contrast", ratio, limit, flagged, msg, {"lesions_below_median": below[:50]})


def _count_check(name: str, lesions: list[int], allowed: int, what: str) -> QCCheck:
    flagged = len(lesions) > allowed
    msg = f"{len(lesions)} {what}" if lesions else "none"
    return QCCheck(
        name, float(len(lesions)), f"<= {allowed} lesions", flagged, msg, {"lesions": lesions[:100]}
    )


def _confluent_check(lesions: list[int], n_lesions: int, max_share: float) -> QCCheck:
    share = len(lesions) / n_lesions if n_lesions else 0.0
    flagged = share > max_share
    msg = (
        f"{len(lesions)} of {n_lesions} lesions touch another lesion: each patch masks its neighbour out, "
        "cutting a shared rim" + (" (most of them: is the lesion map splitting plaques?)" if flagged else "")
    )
    detail = {"count": len(lesions), "lesions": lesions[:100]}
    return QCCheck("qc_confluent", share, f"<= {max_share:g} of lesions", flagged, msg, detail)


# -- per-lesion geometry ----------------------------------------------------------------------------------


def _cropped_lesions(instances: np.ndarray, patch_size: tuple[int, int, int]) -> list[int]:
    """Lesions with voxels outside the patch window of :func:`qsmrim.data.extract_patches`.

    That window starts at ``floor(centre + 0.5) - size // 2`` on each axis (x, y, z here; the patch's own
    order is z, y, x) and is ``size`` voxels long. Computed over lesion voxels only.
    """
    coords = np.argwhere(instances > 0)
    if coords.size == 0:
        return []
    index_of, inverse = np.unique(instances[instances > 0], return_inverse=True)
    counts = np.bincount(inverse)
    centre = np.stack([np.bincount(inverse, weights=coords[:, a]) / counts for a in range(3)], axis=1)
    start = np.floor(centre + 0.5).astype(np.int64) - np.array(patch_size[::-1], dtype=np.int64) // 2
    size = np.array(patch_size[::-1], dtype=np.int64)
    outside = ((coords < start[inverse]) | (coords >= start[inverse] + size)).any(axis=1)
    return sorted(int(i) for i in np.unique(index_of[inverse[outside]]))


def _confluent_lesions(instances: np.ndarray) -> list[int]:
    """Lesions with a voxel in the 26-neighbourhood of another lesion's voxel, ascending."""
    touching: set[int] = set()
    box = _bounding_box(instances > 0, margin=1)
    if box is None:
        return []
    instances = instances[box]
    shape = instances.shape
    offsets = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
               if (dx, dy, dz) > (0, 0, 0)]  # one of each opposite pair: 13 offsets  # fmt: skip
    for off in offsets:
        src = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(off, shape, strict=True))
        dst = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(off, shape, strict=True))
        a, b = instances[src], instances[dst]
        hit = (a != b) & (a > 0) & (b > 0)
        if hit.any():
            touching.update(np.unique(a[hit]).tolist())
            touching.update(np.unique(b[hit]).tolist())
    return sorted(int(i) for i in touching)


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels (clipped to the array), or None if empty."""
    spans = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        spans.append(slice(max(0, int(hit[0]) - margin), min(mask.shape[axis], int(hit[-1]) + 1 + margin)))
    return tuple(spans)


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"
