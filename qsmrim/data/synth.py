"""A synthetic BIDS cohort that looks like the paper's data (the demo's and the tests' default input).

Each subject is a brain-shaped head at 0.75 x 0.75 x 3 mm with white matter, cortex, deep grey matter and
CSF; QSM in ppm (brain-masked, tissue about -0.1..0.2), FLAIR with hyperintense lesions. Lesions range from
one voxel to about 15 x 20 x 5 voxels, some touching. Per-subject rim+ counts are zero-inflated and skewed as
in the paper's Fig. 3 (about 4-5% rim+ overall).

The cohort is hard in the way real QSM is (paper section 4, Fig. 8), so that a classifier of first-order
statistics (APRL(RF)) can be beaten by one that sees where the susceptibility sits in a lesion:

* rim+ lesions have a paramagnetic shell on their edge and an iso- or hypointense core; some rims are partial
  (an arc), some lesions are heterogeneous (patchy hyperintensity inside as well, Fig. 8C);
* rim- lesions are iso- or hypointense, homogeneously hyperintense at the level of a rim+ lesion's mean,
  *centrally* hyperintense (the same intensities as a rim, at the centre instead of the edge: the same
  histogram, so the mean and percentiles of QSM cannot tell them apart), or crossed at their edge by a vein
  (a hyperintense tube that makes a rim-like arc, Fig. 8B); a share of rim- lesions is as large as rim+ ones;
* veins also run through the brain elsewhere and across some rim+ lesions;
* rim contrast and noise vary between subjects.

``difficulty`` in [0, 1] lowers rim contrast, raises noise and the share of partial and heterogeneous rims,
and makes a share of lesions ambiguous (faint rims on both classes), so models cannot score perfectly.

Same seed, same bytes: every subject draws its geometry from ``default_rng([seed, subject_number])`` and its
appearance from ``default_rng([seed, subject_number, 1])``; gzip headers carry no time stamp.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from qsmrim.data.nifti_io import write_nifti

__all__ = ["SynthConfig", "SyntheticLesion", "draw_lesion_counts", "synthesize_subject", "synthesize_cohort"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic cohort; defaults mimic the paper (Table 1, Fig. 3)."""

    shape: tuple[int, int, int] = (160, 160, 40)
    spacing: tuple[float, float, float] = (0.75, 0.75, 3.0)
    difficulty: float = 0.5
    mean_rim_neg_lesions: float = 23.0
    p_no_rim_subject: float = 0.55
    rim_count_geometric_p: float = 0.4
    touching_share: float = 0.2
    max_radii_vox: tuple[float, float, float] = (7.5, 10.0, 2.5)
    large_rim_neg_share: float = 0.35
    rim_neg_kinds: tuple[tuple[str, float], ...] = (("iso", 0.30), ("hypo", 0.12), ("hyper", 0.20),
                                                    ("central", 0.20), ("vein", 0.18))  # fmt: skip
    veins_per_subject: float = 6.0
    vein_across_rim_share: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], not {self.difficulty!r}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be three ints >= 8, not {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        kinds = tuple((str(k), float(p)) for k, p in self.rim_neg_kinds)
        unknown = sorted({k for k, _ in kinds} - set(RIM_NEG_KINDS))
        if unknown or abs(sum(p for _, p in kinds) - 1.0) > 1e-6:
            raise ValueError(f"rim_neg_kinds must give probabilities summing to 1 over {RIM_NEG_KINDS}, not {kinds!r}")
        object.__setattr__(self, "rim_neg_kinds", kinds)


@dataclass
class SyntheticLesion:
    """Ground truth of one generated lesion."""

    index: int
    rim: int
    kind: str
    ambiguous: bool
    n_voxels: int = 0
    centre: tuple[int, int, int] = field(default=(0, 0, 0))


#: Appearances of rim- lesions (``kind`` column of the lesion TSV; ``mimic`` is the ambiguous one).
RIM_NEG_KINDS: tuple[str, ...] = ("iso", "hypo", "hyper", "central", "vein")

_TISSUE_QSM = {"wm": -0.025, "gm": 0.015, "deep_gm": 0.11, "csf": 0.0}
_TISSUE_FLAIR = {"wm": 0.70, "gm": 0.92, "deep_gm": 0.80, "csf": 0.15, "scalp": 0.55}


def draw_lesion_counts(rng: np.random.Generator, cfg: SynthConfig) -> tuple[int, int]:
    """(rim+, rim-) lesion counts of one subject: zero-inflated geometric rim+, Poisson rim-."""
    n_pos = 0 if rng.random() < cfg.p_no_rim_subject else int(rng.geometric(cfg.rim_count_geometric_p))
    n_neg = int(rng.poisson(cfg.mean_rim_neg_lesions))
    return n_pos, max(n_neg, 1)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = [(s - 1) / 2 for s in shape]
    return tuple(np.arange(s, dtype=np.float32)[tuple(slice(None) if i == d else None for d in range(3))] - c[i]
                 for i, s in enumerate(shape))  # type: ignore[return-value]  # fmt: skip


def _anatomy(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Boolean tissue masks of a brain-shaped head."""
    x, y, z = _grid(cfg.shape)
    nx, ny, nz = cfg.shape
    scale = rng.uniform(0.94, 1.04, size=3)
    ax, ay, az = 0.40 * nx * scale[0], 0.45 * ny * scale[1], 0.46 * nz * scale[2]
    # A slightly egg-shaped head: wider at the back (y < 0).
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 * (1 - 0.08 * np.tanh(y / ay)) + (z / az) ** 2)
    brain = r < 1.0
    csf_outer = (r >= 0.96) & brain
    gm = (r >= 0.85) & (r < 0.96)
    vent = np.zeros(cfg.shape, bool)
    for side in (-1, 1):
        cx = side * 0.10 * nx
        rv = np.sqrt(((x - cx) / (0.05 * nx)) ** 2 + ((y - 0.02 * ny) / (0.20 * ny)) ** 2 + (z / (0.16 * nz)) ** 2)
        vent |= rv < 1.0
    deep = np.zeros(cfg.shape, bool)
    for side in (-1, 1):
        cx = side * 0.20 * nx
        rd = np.sqrt(((x - cx) / (0.06 * nx)) ** 2 + ((y + 0.02 * ny) / (0.09 * ny)) ** 2 + (z / (0.12 * nz)) ** 2)
        deep |= rd < 1.0
    scalp = (r >= 1.04) & (r < 1.13)
    csf = (csf_outer | vent) & brain
    deep &= ~csf
    gm &= ~csf
    wm = brain & ~csf & ~gm & ~deep
    return {"brain": brain, "wm": wm, "gm": gm, "deep_gm": deep, "csf": csf, "scalp": scalp, "r": r}


def _lesion_shape(rng: np.random.Generator, radii: np.ndarray) -> np.ndarray:
    """Boolean local mask of an irregular ellipsoid with the given voxel radii (x, y, z)."""
    half = np.ceil(radii * 1.25).astype(int) + 1
    gx, gy, gz = np.meshgrid(*[np.arange(-h, h + 1, dtype=np.float32) for h in half], indexing="ij")
    theta = rng.uniform(0, np.pi)
    u = gx * np.cos(theta) + gy * np.sin(theta)
    v = -gx * np.sin(theta) + gy * np.cos(theta)
    d = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (gz / radii[2]) ** 2)
    wobble = ndimage.gaussian_filter(rng.standard_normal(d.shape).astype(np.float32), 1.5)
    wobble /= max(float(np.abs(wobble).max()), 1e-6)
    m = d < 1.0 + 0.18 * wobble
    m[tuple(half)] = True
    return m


def _draw_radii(rng: np.random.Generator, cfg: SynthConfig, rim: bool, large: bool = False) -> np.ndarray:
    mx, my, mz = cfg.max_radii_vox
    if rim or large:  # rim+ lesions are large enough to show a shell; so are some rim- ones
        rxy = rng.uniform(2.5, mx)
        return np.array([rxy, min(rxy * rng.uniform(1.0, 1.35), my), rng.uniform(1.0, mz)])
    size = rng.lognormal(mean=0.6, sigma=0.7)  # many small lesions, a few large
    rxy = float(np.clip(size, 0.4, mx))
    return np.array([rxy, min(rxy * rng.uniform(0.8, 1.35), my), float(np.clip(rng.uniform(0.3, 1.0) * rxy / 2.5, 0.4, mz))])


def synthesize_subject(cfg: SynthConfig, seed: int, number: int, session: int = 1):
    """Volumes (QSM, FLAIR, instances) in RAS [x, y, z] and the lesion truth of one subject.

    ``session`` > 1 gives a follow-up scan of the same subject: the same anatomy, lesions and rims, new image
    noise (from ``default_rng([seed, number, 2, session])``); session 1 is the subject-only scan, bit for bit.
    """
    if session < 1:
        raise ValueError(f"session must be >= 1, not {session!r}")
    rng = np.random.default_rng([seed, number])
    look = np.random.default_rng([seed, number, 1])  # appearance draws, apart from geometry
    d = cfg.difficulty
    tissue = _anatomy(rng, cfg)
    qsm = np.zeros(cfg.shape, np.float32)
    flair = np.zeros(cfg.shape, np.float32)
    for name in ("wm", "gm", "deep_gm", "csf"):
        qsm[tissue[name]] = _TISSUE_QSM[name] + rng.normal(0, 0.005)
        flair[tissue[name]] = _TISSUE_FLAIR[name]
    flair[tissue["scalp"]] = _TISSUE_FLAIR["scalp"]
    smooth = ndimage.gaussian_filter(rng.standard_normal(cfg.shape).astype(np.float32), (6, 6, 2))
    qsm += 0.15 * smooth * tissue["brain"]
    subject = _SubjectLook(contrast=float(look.uniform(1 - 0.4 * d, 1 + 0.4 * d)),
                           noise=float((0.008 + 0.014 * d) * look.uniform(0.75, 1.35)))  # fmt: skip

    n_pos, n_neg = draw_lesion_counts(rng, cfg)
    kinds = [1] * n_pos + [0] * n_neg
    rng.shuffle(kinds)
    instances = np.zeros(cfg.shape, np.int32)
    rim_map = np.zeros(cfg.shape, np.float32)
    vein_map = np.zeros(cfg.shape, np.float32)
    truth: list[SyntheticLesion] = []
    candidates = np.argwhere(tissue["wm"] & (tissue["r"] < 0.8))
    for rim in kinds:
        large = bool(not rim and look.random() < cfg.large_rim_neg_share)
        for _attempt in range(30):
            radii = _draw_radii(rng, cfg, bool(rim), large)
            shape = _lesion_shape(rng, radii)
            half = np.array(shape.shape) // 2
            if truth and rng.random() < cfg.touching_share:
                other = truth[int(rng.integers(len(truth)))]
                direction = rng.normal(size=3) * np.array([1, 1, 0.3])
                direction /= np.linalg.norm(direction) + 1e-9
                centre = np.round(np.array(other.centre) + direction * (radii + 1.5)).astype(int)
            else:
                centre = candidates[int(rng.integers(len(candidates)))]
            lo, hi = centre - half, centre - half + np.array(shape.shape)
            if np.any(lo < 1) or np.any(hi > np.array(cfg.shape) - 1):
                continue
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            mine = shape & (instances[box] == 0) & tissue["brain"][box]
            if mine.sum() < max(1, 0.7 * shape.sum()):
                continue
            break
        else:
            continue
        idx = len(truth) + 1
        instances[box][mine] = idx
        lesion = SyntheticLesion(index=idx, rim=rim, kind="", ambiguous=bool(rng.random() < 0.15 * d),
                                 n_voxels=int(mine.sum()), centre=tuple(int(c) for c in centre))  # fmt: skip
        _paint_lesion(look, cfg, subject, lesion, mine, box, qsm, flair, rim_map, vein_map, half)
        truth.append(lesion)

    for _ in range(int(look.poisson(cfg.veins_per_subject))):  # veins elsewhere in the white matter
        p = candidates[int(look.integers(len(candidates)))]
        _paint_vein(look, vein_map, p, look.uniform(-np.pi, np.pi), _vein_contrast(look, subject))
    rim_map = ndimage.gaussian_filter(rim_map, (0.6, 0.6, 0.3))
    qsm += rim_map + ndimage.gaussian_filter(vein_map, (0.5, 0.5, 0.2))
    qsm = ndimage.gaussian_filter(qsm, (0.5, 0.5, 0.2))
    noise = rng if session == 1 else np.random.default_rng([seed, number, 2, session])
    qsm += noise.normal(0, subject.noise, cfg.shape).astype(np.float32)
    qsm[~tissue["brain"]] = 0.0
    flair = ndimage.gaussian_filter(flair, (0.6, 0.6, 0.3))
    flair += noise.normal(0, 0.03 + 0.03 * d, cfg.shape).astype(np.float32)
    flair = np.clip(flair, 0, None)
    return qsm.astype(np.float32), flair.astype(np.float32), instances, truth


@dataclass(frozen=True)
class _SubjectLook:
    """What varies between subjects' scans: a rim/vein contrast factor and the QSM noise level (ppm)."""

    contrast: float
    noise: float


def _rim_contrast(rng: np.random.Generator, cfg: SynthConfig, subject: _SubjectLook) -> float:
    """Peak susceptibility of a rim above its lesion (ppm): about 0.04-0.09 at difficulty 0.5."""
    return float(rng.uniform(0.05, 0.12) * (1 - 0.5 * cfg.difficulty) * subject.contrast)


def _vein_contrast(rng: np.random.Generator, subject: _SubjectLook) -> float:
    """Veins are at least as bright as rims (deoxygenated blood is strongly paramagnetic)."""
    return float(rng.uniform(0.06, 0.14) * subject.contrast)


def _paint_lesion(rng, cfg, subject, lesion, mine, box, qsm, flair, rim_map, vein_map, half) -> None:
    d = cfg.difficulty
    flair[box][mine] = rng.uniform(1.35, 2.0) * (1 + 0.05 * rng.standard_normal(int(mine.sum())))
    wm = _TISSUE_QSM["wm"]
    faint = (0.015, 0.035)
    shell = _shell(mine)
    if lesion.rim:
        partial = rng.random() < 0.25 + 0.3 * d
        heterogeneous = rng.random() < 0.1 + 0.2 * d
        lesion.kind = "rim-heterogeneous" if heterogeneous else "rim-partial" if partial else "rim-complete"
        contrast = rng.uniform(*faint) if lesion.ambiguous else _rim_contrast(rng, cfg, subject)
        qsm[box][mine] = wm + rng.uniform(-0.02, 0.01)
        rim_map[box][_arc(rng, shell, half) if partial else shell] += contrast
        if heterogeneous:  # patchy hyperintensity inside as well: the rim is harder to see (Fig. 8C)
            patches = ndimage.gaussian_filter(rng.standard_normal(mine.shape).astype(np.float32), 1.0)
            rim_map[box][mine] += (0.6 * contrast * np.clip(patches / (patches.std() + 1e-6), 0, None))[mine]
        if rng.random() < cfg.vein_across_rim_share:
            _vein_at_edge(rng, vein_map, box, shell, half, subject)
        return
    if lesion.ambiguous:
        lesion.kind = "mimic"
        qsm[box][mine] = wm + rng.uniform(-0.01, 0.01)
        rim_map[box][_arc(rng, shell, half)] += rng.uniform(*faint)
        return
    names, probs = zip(*cfg.rim_neg_kinds, strict=True)
    lesion.kind = str(rng.choice(names, p=np.asarray(probs) / sum(probs)))
    if lesion.kind == "iso":
        qsm[box][mine] = wm + rng.normal(0, 0.005)
    elif lesion.kind == "hypo":
        qsm[box][mine] = wm - rng.uniform(0.02, 0.05)
    elif lesion.kind == "hyper":  # homogeneous, at the mean a rim+ lesion of this size would have
        share = shell.sum() / max(int(mine.sum()), 1)
        qsm[box][mine] = wm + rng.uniform(-0.02, 0.01) + _rim_contrast(rng, cfg, subject) * share * rng.uniform(0.7, 1.3)
    elif lesion.kind == "central":  # a rim's intensities at the centre: the histogram of a rim+ lesion
        qsm[box][mine] = wm + rng.uniform(-0.02, 0.01)
        rim_map[box][_centre(mine, int(shell.sum()))] += _rim_contrast(rng, cfg, subject)
    else:  # "vein": an iso lesion whose edge a vein runs along (a rim-like arc, Fig. 8B)
        qsm[box][mine] = wm + rng.normal(0, 0.005)
        _vein_at_edge(rng, vein_map, box, shell, half, subject)


def _shell(mine: np.ndarray) -> np.ndarray:
    """The lesion's one-voxel in-plane edge."""
    return mine & ~ndimage.binary_erosion(mine, structure=np.ones((3, 3, 1), bool))


def _arc(rng: np.random.Generator, shell: np.ndarray, half: np.ndarray) -> np.ndarray:
    """The part of ``shell`` within a random arc of 180-306 degrees around the lesion centre (in-plane)."""
    gx, gy = np.meshgrid(np.arange(shell.shape[0]) - half[0], np.arange(shell.shape[1]) - half[1], indexing="ij")
    angle = np.arctan2(gy, gx)[..., None]
    start, arc = rng.uniform(-np.pi, np.pi), rng.uniform(np.pi, 1.7 * np.pi)
    return shell & (np.mod(angle - start, 2 * np.pi) < arc)


def _centre(mine: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` voxels of ``mine`` deepest inside it (in-plane distance to its edge, in voxels)."""
    depth = np.stack([ndimage.distance_transform_edt(np.pad(mine[..., z], 1))[1:-1, 1:-1]
                      for z in range(mine.shape[2])], axis=-1)  # fmt: skip
    order = np.argsort(-depth[mine], kind="stable")[:n]
    out = np.zeros_like(mine)
    out[tuple(a[order] for a in np.nonzero(mine))] = True
    return out


def _vein_at_edge(rng, vein_map, box, shell, half, subject) -> None:
    """A vein along the lesion's edge: through an edge voxel, tangent to the lesion in-plane."""
    edge = np.argwhere(shell)
    if not len(edge):
        return
    p = edge[int(rng.integers(len(edge)))]
    radial = np.arctan2(p[1] - half[1], p[0] - half[0])
    start = np.array([s.start for s in box])
    _paint_vein(rng, vein_map, start + p, radial + np.pi / 2 + rng.normal(0, 0.25), _vein_contrast(rng, subject))


def _paint_vein(rng, vein_map, point, angle: float, contrast: float) -> None:
    """A straight in-plane tube (radius about one voxel, 1-2 slices) through ``point`` at ``angle``."""
    half_len = rng.uniform(6, 16)
    radius = rng.uniform(0.6, 1.1)
    u = np.array([np.cos(angle), np.sin(angle)])
    lo = np.maximum(np.floor(point[:2] - half_len - 2).astype(int), 0)
    hi = np.minimum(np.ceil(point[:2] + half_len + 3).astype(int), vein_map.shape[:2])
    z0, z1 = max(int(point[2]) - int(rng.integers(0, 2)), 0), min(int(point[2]) + 1, vein_map.shape[2])
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0]) - point[0], np.arange(lo[1], hi[1]) - point[1], indexing="ij")
    along = gx * u[0] + gy * u[1]
    across = np.abs(-gx * u[1] + gy * u[0])
    tube = (across < radius) & (np.abs(along) < half_len)
    vein_map[lo[0]:hi[0], lo[1]:hi[1], z0:z1][tube] = np.maximum(vein_map[lo[0]:hi[0], lo[1]:hi[1], z0:z1][tube], contrast)


def synthesize_cohort(
    out: str | Path,
    n_subjects: int,
    seed: int = 0,
    *,
    config: SynthConfig | None = None,
    shape: tuple[int, int, int] | None = None,
    difficulty: float | None = None,
    first_subject: int = 1,
    sessions: int | None = None,
    progress: bool = False,
) -> Path:
    """Write a BIDS root (DESIGN §3) with ``n_subjects`` synthetic subjects; return its path.

    Subjects are numbered from ``first_subject``; subject ``k`` is the same for every cohort of one seed,
    so ``first_subject=n + 1`` gives held-out subjects that no ``n``-subject cohort contains. ``sessions``
    writes each subject as that many sessions ``sub-<k>/ses-<j>/anat/`` (same lesions, new noise; see
    :func:`synthesize_subject`) with a ``sub-<k>_sessions.tsv``; ``None`` writes the subject-only layout.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be >= 1, not {n_subjects!r}")
    if sessions is not None and sessions < 1:
        raise ValueError(f"sessions must be >= 1, not {sessions!r}")
    cfg = config or SynthConfig()
    overrides = {k: v for k, v in (("shape", shape), ("difficulty", difficulty)) if v is not None}
    if overrides:
        cfg = SynthConfig(**{**asdict(cfg), **overrides})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*cfg.spacing, 1.0])
    affine[:3, 3] = -np.array(cfg.spacing) * (np.array(cfg.shape) - 1) / 2
    if first_subject < 1:
        raise ValueError(f"first_subject must be >= 1, not {first_subject!r}")
    numbers = range(first_subject, first_subject + n_subjects)
    if progress:
        from rich.progress import track

        numbers = track(numbers, description="synthesizing", transient=True)  # type: ignore[assignment]
    participants = ["participant_id\tn_lesions\tn_rim_pos"]
    for number in numbers:
        sid = f"sub-{number:03d}"
        for session in range(1, (sessions or 1) + 1):
            qsm, flair, inst, truth = synthesize_subject(cfg, seed, number, session)
            ses = f"ses-{session:02d}" if sessions else None
            prefix = f"{sid}_{ses}" if ses else sid
            folder = Path(sid, ses, "anat") if ses else Path(sid, "anat")
            anat = out / folder
            der = out / "derivatives" / "lesions" / folder
            write_nifti(anat / f"{prefix}_Chimap.nii.gz", qsm, affine)
            write_nifti(anat / f"{prefix}_FLAIR.nii.gz", flair, affine)
            write_nifti(der / f"{prefix}_desc-lesions_dseg.nii.gz", inst.astype(np.int16), affine)
            rows = ["index\trim\tkind\tambiguous\tn_voxels"]
            rows += [f"{t.index}\t{t.rim}\t{t.kind}\t{int(t.ambiguous)}\t{t.n_voxels}" for t in truth]
            (der / f"{prefix}_desc-lesions_dseg.tsv").write_text("\n".join(rows) + "\n")
        if sessions:
            table = ["session_id"] + [f"ses-{k:02d}" for k in range(1, sessions + 1)]
            (out / sid / f"{sid}_sessions.tsv").write_text("\n".join(table) + "\n")
        participants.append(f"{sid}\t{len(truth)}\t{sum(t.rim for t in truth)}")
    (out / "participants.tsv").write_text("\n".join(participants) + "\n")
    desc = {"Name": "qsmrim synthetic cohort", "BIDSVersion": "1.9.0", "DatasetType": "raw",
            "GeneratedBy": [{"Name": "qsmrim synth", "Description": json.dumps({"seed": seed, **asdict(cfg)})}]}  # fmt: skip
    (out / "dataset_description.json").write_text(json.dumps(desc, indent=2) + "\n")
    der_desc = {"Name": "lesion instances and rim labels", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qsmrim synth"}]}  # fmt: skip
    (out / "derivatives" / "lesions" / "dataset_description.json").write_text(json.dumps(der_desc, indent=2) + "\n")
    log.info("wrote %d synthetic subjects (%s session(s) each) to %s", n_subjects, sessions or "no", out)
    return out
