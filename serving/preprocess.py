"""One subject's NIfTI trio -> validated lesion geometry, patches and raw radiomics, through ``qsmrim`` only.

Serving and offline ``predict`` share this module so that an HTTP answer and a derivatives TSV come from
the same code path as training data: :func:`qsmrim.data.load_subject` validates (grids, NaN/Inf inside
lesions, empty maps, labels), :func:`qsmrim.data.lesions.lesion_rows` gives centroids and volumes,
:func:`qsmrim.data.extract_patches` the patches and :func:`qsmrim.radiomics.extract_volumes` the 527 raw
features (NaN passes through; the ONNX graph fills it with the training median).

Uploads are written to a private temporary folder first because the data layer reads files; each image's
header is parsed by :mod:`qsmrim.data.nifti_io` (never ``nibabel.load``, which reads header extensions first)
and checked against a voxel cap and a byte cap before any data is decompressed, and then exactly the bytes the
header's shape and dtype need are decompressed, so a small gzip cannot expand into gigabytes inside a
replica.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qsmrim.data import PatchSpec, SubjectFiles, SubjectVolumes, extract_patches, load_subject
from qsmrim.data.errors import InputError, Problem
from qsmrim.data.lesions import lesion_rows
from qsmrim.data.nifti_io import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_VOXELS, NiftiLimits, read_header
from qsmrim.data.qc import QCConfig, QCPolicy, QCReport, enforce_qc, run_qc

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_VOXELS",
    "LESION_COLUMNS",
    "PrepareLimits",
    "PreparedSubject",
    "SubjectUpload",
    "check_image_sizes",
    "lesion_records",
    "prepare_files",
    "prepare_upload",
    "prepare_volumes",
]

log = logging.getLogger(__name__)

LESION_COLUMNS = (
    "index", "centroid_mm_x", "centroid_mm_y", "centroid_mm_z", "volume_mm3", "prob", "votes", "spread", "rim",
)  # fmt: skip
"""Per-lesion fields of the HTTP answer and of the derivatives TSV, in this order."""

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class PrepareLimits:
    """What one subject may cost before its data is decompressed, and the QC policy it is held to.

    ``max_lesions`` refuses a lesion map with more lesions before any radiomics are computed, so one request
    cannot occupy a replica for hours; ``qc="strict"`` refuses a flagged subject, naming ``qc_setting`` as the
    place strictness was chosen.
    """

    max_voxels: int = DEFAULT_MAX_VOXELS
    max_lesions: int | None = None
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    qc: QCPolicy = "warn"
    qc_setting: str = "--qc strict"


@dataclass(frozen=True)
class SubjectUpload:
    """Raw bytes of one subject as uploaded; ``names`` are the client's file names (for messages only)."""

    qsm: bytes
    flair: bytes
    lesions: bytes
    labels: bytes | None = None
    lesions_kind: str = "dseg"
    names: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedSubject:
    """Model inputs of one subject's lesions (ascending lesion index) with their geometry.

    ``lesions`` holds ``index``, ``centroid_mm_x/y/z`` (scanner mm), ``volume_mm3`` and, when labels
    were given, ``label`` (1, 0 or None). ``radiomics`` is raw (not standardised), NaN where pyradiomics
    could not describe a lesion; ``radiomics_status`` says why per lesion.
    """

    subject: str
    lesions: list[dict[str, Any]]
    patch: np.ndarray
    radiomics: np.ndarray
    radiomics_status: list[str]
    has_labels: bool = False
    qc: QCReport | None = None

    def __len__(self) -> int:
        return len(self.lesions)


def check_image_sizes(files: SubjectFiles, max_voxels: int, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
    """Refuse images whose header declares more than ``max_voxels`` voxels or ``max_bytes`` of data.

    Reads each header only (at most 540 decompressed bytes, extensions not parsed; see
    :func:`qsmrim.data.nifti_io.read_header`), so every oversized or malformed file of the upload is named
    before any image data is decompressed.
    """
    limits = NiftiLimits(max_voxels=max_voxels, max_bytes=max_bytes)
    problems = []
    for path in (files.qsm, files.flair, files.lesions):
        try:
            read_header(path, limits)
        except InputError as exc:
            problems += exc.problems
    if problems:
        raise InputError(problems)


def prepare_volumes(vol: SubjectVolumes, patch_size: tuple[int, int, int] = (16, 32, 32)) -> PreparedSubject:
    """Lesion geometry, patches and raw radiomics of an already validated subject."""
    from qsmrim.radiomics import FEATURE_NAMES, extract_volumes

    rows = lesion_rows(vol)
    indices = [int(r["lesion"]) for r in rows]
    patch = extract_patches(vol, indices, PatchSpec(tuple(patch_size)))
    table = extract_volumes(vol, indices)
    if table["lesion"].astype(int).tolist() != indices:
        raise RuntimeError(
            f"sub-{vol.subject}: radiomics rows {table['lesion'].tolist()} differ from lesions {indices}"
        )
    with np.errstate(over="ignore"):
        radiomics = table[list(FEATURE_NAMES)].to_numpy(np.float64).astype(np.float32)
    has_labels = any(v is not None for v in vol.labels.values())
    lesions = []
    for r in rows:
        item = {"index": int(r["lesion"]), **{k: float(r[k]) for k in LESION_COLUMNS[1:5]}}
        if has_labels:
            item["label"] = vol.labels.get(int(r["lesion"]))
        lesions.append(item)
    return PreparedSubject(
        vol.subject, lesions, patch, radiomics, table["status"].astype(str).tolist(), has_labels
    )


def prepare_files(
    files: SubjectFiles,
    patch_size: tuple[int, int, int] = (16, 32, 32),
    limits: PrepareLimits = PrepareLimits(),
) -> tuple[SubjectVolumes, PreparedSubject]:
    """Check sizes, load and validate one subject (:func:`qsmrim.data.load_subject`), QC it, then prepare it.

    QC (:func:`qsmrim.data.qc.run_qc`) runs before patches and radiomics; under ``limits.qc == "strict"`` a
    flagged subject is refused there, else its report rides on :attr:`PreparedSubject.qc`.
    """
    check_image_sizes(files, limits.max_voxels, limits.max_bytes)
    vol = load_subject(files, limits=NiftiLimits(max_voxels=limits.max_voxels, max_bytes=limits.max_bytes))
    n = len(vol.lesion_indices)
    if limits.max_lesions is not None and n > limits.max_lesions:
        raise InputError(
            f"{n} lesions exceed the limit of {limits.max_lesions} per request", where=str(files.lesions)
        )
    report = run_qc(vol, QCConfig(patch_size=tuple(patch_size)))
    enforce_qc(report, limits.qc, str(files.qsm), limits.qc_setting)
    return vol, replace(prepare_volumes(vol, patch_size), qc=report)


def prepare_upload(
    upload: SubjectUpload,
    patch_size: tuple[int, int, int] = (16, 32, 32),
    limits: PrepareLimits = PrepareLimits(),
) -> PreparedSubject:
    """Write an upload to a private temp folder and prepare it; problems name the form field, not temp paths."""
    if upload.lesions_kind not in ("dseg", "mask"):
        raise InputError(
            f"must be 'dseg' (instance labels) or 'mask' (binary), not {upload.lesions_kind!r}",
            where="lesions_kind",
        )
    empty = [f for f in ("qsm", "flair", "lesions") if not getattr(upload, f)]
    if empty:
        raise InputError([Problem(f, "empty file") for f in empty])
    with tempfile.TemporaryDirectory(prefix="qsmrim-upload-") as tmp:
        paths: dict[str, Path] = {}
        for key in ("qsm", "flair", "lesions"):
            data: bytes = getattr(upload, key)
            paths[key] = Path(tmp) / (f"{key}.nii.gz" if data[:2] == _GZIP_MAGIC else f"{key}.nii")
            paths[key].write_bytes(data)
        if upload.labels is not None:
            paths["labels"] = Path(tmp) / "labels.tsv"
            paths["labels"].write_bytes(upload.labels)
        files = SubjectFiles(
            "upload", paths["qsm"], paths["flair"], paths["lesions"], paths.get("labels"), upload.lesions_kind
        )
        try:
            _, prepared = prepare_files(files, patch_size, limits)
        except InputError as exc:
            raise _rename(exc, paths, upload.names) from None
    return prepared


def _rename(exc: InputError, paths: dict[str, Path], names: dict[str, str]) -> InputError:
    """Replace temp paths in problems by the form field (and the client's file name)."""

    def label(key: str) -> str:
        return f"{key} ({names[key]})" if names.get(key) else key

    def fix(text: str) -> str:
        for key, path in paths.items():
            text = text.replace(str(path), label(key))
        return text

    problems = [replace(p, where=fix(p.where), what=fix(p.what)) for p in exc.problems]
    return InputError(problems)


def lesion_records(prepared: PreparedSubject, outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-lesion answer (:data:`LESION_COLUMNS`, plus ``label`` when known): geometry joined to model outputs."""
    records = []
    for i, lesion in enumerate(prepared.lesions):
        spread = float(outputs["spread"][i])
        rec = {
            **{k: lesion[k] for k in LESION_COLUMNS[:5]},
            "prob": float(outputs["prob"][i]),
            "votes": int(outputs["votes"][i]),
            "spread": spread if np.isfinite(spread) else None,
            "rim": bool(outputs["rim"][i]),
        }
        if "label" in lesion:
            rec["label"] = lesion["label"]
        records.append(rec)
    return records
