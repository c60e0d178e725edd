"""Offline inference (``qsmrim predict``): a BIDS root, manifest or one subject -> a BIDS-derivatives dataset.

Runs the same preprocessing (:mod:`serving.preprocess`) and onnxruntime session (:mod:`serving.model`) as
the HTTP service, in-process and without Ray, so a TSV row and an HTTP answer for the same lesion agree.

Layout written under ``out_dir`` (maps are on the input QSM's own voxel grid and affine, not RAS+)::

    dataset_description.json                       DatasetType derivative; GeneratedBy qsmrim + model + commit
    participants.tsv / .json                       cohort table: lesions and predicted (and expert) rim+ counts
    scans.tsv / .json                              one row per scan (only when a scan has ses-/acq-/rec-/run-)
    desc-rim_lesions.json                          column descriptions of every *_desc-rim_lesions.tsv
    sub-<id>/anat/sub-<id>_desc-rim_lesions.tsv    index, centroid_mm_x/y/z, volume_mm3, prob, votes, spread, rim
    sub-<id>/anat/sub-<id>_label-rim_probseg.nii.gz   each lesion's voxels carry its rim probability
    sub-<id>/anat/sub-<id>_desc-rimpos_dseg.nii.gz    rim+ lesions keep their instance index, else 0 (+ .tsv)
    sub-<id>/anat/sub-<id>_desc-rimpos_mask.nii.gz    1 on rim+ lesion voxels

A scan with entities keeps them: ``sub-01/ses-02/anat/sub-01_ses-02_acq-gre_desc-rim_lesions.tsv`` and so on
(:func:`qsmrim.data.scan_folder`); participants.tsv then has one row per subject (``n_scans``, counts the
largest over its scans) and scans.tsv one row per scan.
    sub-<id>.html                                  review page: lesions in review order with thumbnails
    index.html                                     every scan of the folder with a link to its page

Subjects are independent: an invalid subject is reported (``PredictResult.problems``) and the others are
still written. Predicting into a folder made with the *same* model adds or replaces subjects there; a
folder made with another model is refused, so one dataset never mixes models.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qsmrim import __version__
from qsmrim.atomic import atomic_path, write_text_atomic
from qsmrim.data import LesionSource, SubjectFiles, participant_of, scan_folder, session_of, write_nifti
from qsmrim.data.cohort import SubjectVolumes, compact_instances, scan_cohort
from qsmrim.data.errors import InputError, Problem
from qsmrim.data.qc import QCPolicy
from qsmrim.provenance import git_commit
from qsmrim.review import render_thumbnails, write_index_page, write_review_page
from serving.model import ModelInfo, Providers, RimModel
from serving.preprocess import (
    DEFAULT_MAX_VOXELS,
    LESION_COLUMNS,
    PreparedSubject,
    PrepareLimits,
    prepare_files,
)
from serving.screening import add_lesion_flags, resolve_thresholds, review_flags

__all__ = ["PredictResult", "SubjectResult", "predict_dataset", "resolve_subjects"]

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
_SUB_DIR = re.compile(r"^sub-([A-Za-z0-9]+)$")
_SES_DIR = re.compile(r"^ses-([A-Za-z0-9]+)$")
_COUNTS = ("n_lesions", "n_rim_predicted", "n_rim_expert")

LESION_COLUMN_DOCS = {
    "index": {"Description": "Lesion instance index in the input lesion map (dseg value, or 26-connected "
                             "component number of a binary mask)"},
    "centroid_mm_x": {"Description": "Lesion centre of mass, scanner x (RAS+)", "Units": "mm"},
    "centroid_mm_y": {"Description": "Lesion centre of mass, scanner y (RAS+)", "Units": "mm"},
    "centroid_mm_z": {"Description": "Lesion centre of mass, scanner z (RAS+)", "Units": "mm"},
    "volume_mm3": {"Description": "Lesion volume", "Units": "mm^3"},
    "prob": {"Description": "Mean member probability of a paramagnetic rim (0..1)"},
    "votes": {"Description": "Ensemble members at or above their own threshold"},
    "spread": {"Description": "Standard deviation of the member probabilities: the lesion's uncertainty "
                            "(n/a when the model has no spread output)"},
    "rim": {"Description": "Predicted rim+ by majority vote", "Levels": {"1": "rim+", "0": "rim-"}},
    "review": {"Description": "prob at or above the screening threshold (CV's high-sensitivity point, or the "
                              "operator's override; the rim call when the model has none): lesions an expert "
                              "should look at. The threshold used and its source are in the scan's JSON sidecar "
                              "(Thresholds)", "Levels": {"1": "review", "0": "no review"}},
    "qc_cropped": {"Description": "The lesion extends beyond its 32x32x16 patch: the model saw it cropped",
                   "Levels": {"1": "cropped", "0": "whole"}},
    "qc_confluent": {"Description": "The lesion touches another lesion (26-neighbourhood); its patch masks the "
                                    "neighbour out", "Levels": {"1": "confluent", "0": "isolated"}},
}  # fmt: skip

QC_SIDECAR_DOC = (
    "qc_* entries: QSM input QC of this scan (qsmrim.data.qc), each with its measured value, the limit, "
    "whether it is flagged and why; QCPolicy warn predicts anyway, strict refuses flagged scans"
)


@dataclass(frozen=True)
class SubjectResult:
    """One written subject: lesion and rim+ counts and its files."""

    subject: str
    n_lesions: int
    n_rim: int
    n_rim_expert: int | None
    files: dict[str, Path]
    n_review: int = 0
    qc_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict_dataset` wrote and which subjects it could not predict (and why)."""

    out_dir: Path
    subjects: list[SubjectResult]
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def resolve_subjects(
    source: str | Path, lesions: LesionSource | None = None
) -> tuple[Path, list[SubjectFiles], list[Problem]]:
    """Scans of a BIDS root, a CSV manifest, one ``sub-<id>`` folder or one ``sub-<id>/ses-<id>`` folder.

    Returns the dataset root (or manifest), the complete scans and the problems of incomplete ones.
    """
    source = Path(source)
    ses = _SES_DIR.match(source.name)
    sub = _SUB_DIR.match(source.parent.name if ses else source.name)
    if sub and source.is_dir():
        root = source.parent.parent if ses else source.parent
        cohort, problems = scan_cohort(root, lesions=lesions)
        chosen = [s for s in cohort.subjects if s.participant == sub.group(1)
                  and (ses is None or s.session == ses.group(1))]  # fmt: skip
        mark = f"sub-{sub.group(1)}" + (f"_ses-{ses.group(1)}" if ses else "")
        problems = [p for p in problems if mark in p.where or str(source) in p.where]
        if not chosen and not problems:
            raise InputError(f"no scan of this folder found in the BIDS root {root}", where=source)
        return root, chosen, problems
    cohort, problems = scan_cohort(source, lesions=lesions)
    return source, list(cohort.subjects), problems


def predict_dataset(
    model: str | Path | RimModel,
    source: str | Path,
    out_dir: str | Path,
    *,
    providers: Providers = "auto",
    threads: int = 0,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    tracking_uri: str | None = None,
    lesions: LesionSource | None = None,
    qc: QCPolicy = "warn",
    screening_threshold: float | None = None,
) -> PredictResult:
    """Predict every lesion of every scan of ``source`` and write the derivatives dataset to ``out_dir``.

    ``tracking_uri`` is the MLflow store of a ``models:/`` URI (default: ``MLFLOW_TRACKING_URI``); ``lesions``
    says where a BIDS root's lesion maps are (default ``derivatives/lesions``, ``desc-lesions``). ``qc``
    ``"strict"`` refuses scans that trip a QC flag (listed as problems); ``screening_threshold`` overrides the
    model's (``--screening-threshold``).
    """
    out_dir = Path(out_dir)
    rim_model = (
        model
        if isinstance(model, RimModel)
        else RimModel.load(model, providers=providers, threads=threads, tracking_uri=tracking_uri)
    )
    thresholds = resolve_thresholds(rim_model.info.thresholds, screening_threshold, "cli")
    description = _dataset_description(rim_model, Path(source), thresholds)
    _check_same_model(out_dir, description)
    root, subjects, problems = resolve_subjects(source, lesions)
    results: list[SubjectResult] = []
    for files in subjects:
        try:
            vol, prepared = prepare_files(files, rim_model.info.patch_size, PrepareLimits(max_voxels=max_voxels, qc=qc))
        except InputError as exc:
            problems += exc.problems
            log.warning("sub-%s skipped: %s", files.subject, exc)
            continue
        outputs = rim_model.run(prepared.patch, prepared.radiomics)
        results.append(_write_subject(out_dir, files, vol.instances, prepared, outputs, thresholds, qc))
        results[-1].files["review"] = _write_review_page(out_dir, results[-1], vol, rim_model.info)
        log.info("sub-%s: %d lesion(s), %d rim+", files.subject, results[-1].n_lesions, results[-1].n_rim)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "dataset_description.json", description)
    _write_json(out_dir / "desc-rim_lesions.json", LESION_COLUMN_DOCS)
    _write_participants(out_dir, results)
    write_index_page(out_dir)
    return PredictResult(out_dir, results, problems)


# -- writing ----------------------------------------------------------------------------------------------


def _write_subject(
    out_dir: Path,
    files: SubjectFiles,
    instances: np.ndarray,
    prepared: PreparedSubject,
    outputs: dict[str, np.ndarray],
    thresholds: dict[str, Any],
    qc: QCPolicy,
) -> SubjectResult:
    sub = f"sub-{files.subject}"  # the scan's entity prefix: sub-01, sub-01_ses-02_run-1
    anat = out_dir / scan_folder(files.subject)
    anat.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        [{k: les[k] for k in LESION_COLUMNS[:5]} for les in prepared.lesions],
        columns=list(LESION_COLUMNS[:5]),
    )
    table["prob"] = outputs["prob"].astype(np.float64)
    table["votes"] = outputs["votes"].astype(np.int64)
    table["spread"] = outputs["spread"].astype(np.float64)
    table["rim"] = outputs["rim"].astype(np.int64)
    flags = add_lesion_flags([{"index": int(i)} for i in table["index"]],
                             review_flags(outputs["prob"], outputs["rim"], thresholds), prepared.qc)  # fmt: skip
    for col in ("review", "qc_cropped", "qc_confluent"):
        table[col] = [int(f[col]) for f in flags] if col == "review" or prepared.qc is not None else pd.NA
    paths = {"lesions": anat / f"{sub}_desc-rim_lesions.tsv", "qc": anat / f"{sub}_desc-rim_lesions.json"}
    _write_tsv(paths["lesions"], table)
    qc_doc = prepared.qc.as_dict(qc) if prepared.qc is not None else {"policy": qc}
    _write_json(paths["qc"], {
        **{k: v for k, v in qc_doc.items() if k.startswith("qc_")},
        "QCPolicy": qc_doc["policy"], "QCFlags": qc_doc.get("flags", []), "QCDescription": QC_SIDECAR_DOC,
        "Thresholds": thresholds,
    })  # fmt: skip

    indices = table["index"].to_numpy(np.int64)
    # look-up tables over the compact labels 0..K, never sized by the largest lesion index
    compact, index_of = compact_instances(instances)
    rows = np.searchsorted(index_of, indices)
    lut_prob = np.zeros(len(index_of), np.float32)
    lut_prob[rows] = outputs["prob"]
    lut_rim = np.zeros(len(index_of), np.int64)
    lut_rim[rows[outputs["rim"]]] = indices[outputs["rim"]]
    dseg_dtype = np.int16 if int(lut_rim.max(initial=0)) < 2**15 else np.int32
    maps = {
        "probseg": (f"{sub}_label-rim_probseg.nii.gz", lut_prob[compact]),
        "dseg": (f"{sub}_desc-rimpos_dseg.nii.gz", lut_rim[compact].astype(dseg_dtype)),
        "mask": (f"{sub}_desc-rimpos_mask.nii.gz", (lut_rim[compact] > 0).astype(np.uint8)),
    }
    for key, (name, canonical) in maps.items():
        data, affine = _to_input_grid(canonical, files.qsm)
        paths[key] = write_nifti(anat / name, data, affine)
    rim_idx = indices[outputs["rim"]]
    paths["dseg_lut"] = anat / f"{sub}_desc-rimpos_dseg.tsv"
    _write_tsv(paths["dseg_lut"], pd.DataFrame({"index": rim_idx, "name": [f"lesion-{i}" for i in rim_idx]}))
    expert = sum(les.get("label") == 1 for les in prepared.lesions) if prepared.has_labels else None
    qc_flags = tuple(prepared.qc.flags) if prepared.qc is not None else ()
    return SubjectResult(files.subject, len(table), int(outputs["rim"].sum()), expert, paths,
                         int(table["review"].sum()), qc_flags)  # fmt: skip


def _to_input_grid(canonical: np.ndarray, reference: Path) -> tuple[np.ndarray, np.ndarray]:
    """Undo ``nibabel.as_closest_canonical``: RAS+ array -> the reference image's voxel order and affine."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    img = nib.load(str(reference))
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), io_orientation(img.affine))
    data = apply_orientation(canonical, back)
    if data.shape != tuple(img.shape[:3]):
        raise RuntimeError(
            f"{reference}: reoriented map shape {data.shape} differs from the input {img.shape[:3]}"
        )
    return np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64)


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n")


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def _write_participants(out_dir: Path, results: list[SubjectResult]) -> None:
    """Cohort table; rows of subjects predicted earlier into the same folder (same model) are kept.

    Once a scan carries ``ses-``/``acq-``/``rec-``/``run-`` (now, or in an earlier run into the folder:
    scans.tsv exists), :func:`_write_scans` writes scans.tsv and participants.tsv from it instead.
    """
    path = out_dir / "participants.tsv"
    if (out_dir / "scans.tsv").exists() or any(participant_of(r.subject) != r.subject for r in results):
        _write_scans(out_dir, results)
        return
    rows = {
        f"sub-{r.subject}": {
            "n_lesions": r.n_lesions,
            "n_rim_predicted": r.n_rim,
            "n_rim_expert": r.n_rim_expert,
        }
        for r in results
    }
    if path.exists():
        old = pd.read_csv(
            path, sep="\t", na_values="n/a", keep_default_na=False, dtype={"participant_id": str}
        )
        for rec in old.to_dict("records"):
            rows.setdefault(
                str(rec["participant_id"]),
                {k: rec.get(k) for k in ("n_lesions", "n_rim_predicted", "n_rim_expert")},
            )
    table = pd.DataFrame([{"participant_id": k, **v} for k, v in sorted(rows.items())])
    if table.empty:
        table = pd.DataFrame(columns=["participant_id", "n_lesions", "n_rim_predicted", "n_rim_expert"])
    for col in ("n_lesions", "n_rim_predicted", "n_rim_expert"):
        table[col] = pd.array(table[col], dtype="Int64")
    _write_tsv(path, table)
    _write_json(
        out_dir / "participants.json",
        {
            "n_lesions": {"Description": "Lesions in the subject's lesion map"},
            "n_rim_predicted": {"Description": "Lesions predicted rim+ (majority vote)"},
            "n_rim_expert": {
                "Description": "Lesions labelled rim+ in the input label TSV (n/a without labels)"
            },
        },
    )


def _read_tsv(path: Path) -> list[dict[str, Any]]:
    table = pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype=str)
    return table.to_dict("records")


def _write_scans(out_dir: Path, results: list[SubjectResult]) -> None:
    """scans.tsv (one row per scan, kept across runs into the folder) and participants.tsv derived from it:
    one row per subject, ``n_scans`` and each count the largest over its scans (sessions image the same
    lesions, so a sum would count them twice; folds are stratified by the same number)."""
    rows = {r.subject: {"n_lesions": r.n_lesions, "n_rim_predicted": r.n_rim, "n_rim_expert": r.n_rim_expert}
            for r in results}  # fmt: skip
    scans_path, part_path = out_dir / "scans.tsv", out_dir / "participants.tsv"
    if scans_path.exists():
        old = [(str(rec["scan"]).removeprefix("sub-"), rec) for rec in _read_tsv(scans_path)]
    elif part_path.exists():  # a folder of subject-only scans predicted before: each subject is one scan
        old = [(str(rec["participant_id"]).removeprefix("sub-"), rec) for rec in _read_tsv(part_path)]
    else:
        old = []
    for scan, rec in old:
        rows.setdefault(scan, {k: rec.get(k) for k in _COUNTS})
    scans = pd.DataFrame(
        [{"participant_id": f"sub-{participant_of(k)}", "session_id": f"ses-{session_of(k)}" if session_of(k) else None,
          "scan": f"sub-{k}", "lesions_tsv": (scan_folder(k) / f"sub-{k}_desc-rim_lesions.tsv").as_posix(), **v}
         for k, v in sorted(rows.items())],
        columns=["participant_id", "session_id", "scan", "lesions_tsv", *_COUNTS],
    )  # fmt: skip
    for col in _COUNTS:
        scans[col] = pd.array(pd.to_numeric(scans[col]), dtype="Int64")
    _write_tsv(scans_path, scans)
    participants = scans.groupby("participant_id", sort=True).agg(
        n_scans=("scan", "size"), **{c: (c, "max") for c in _COUNTS}
    ).reset_index()
    for col in _COUNTS:
        participants[col] = pd.array(participants[col], dtype="Int64")
    _write_tsv(part_path, participants)
    counts = {
        "n_lesions": "Lesions in the scan's lesion map",
        "n_rim_predicted": "Lesions predicted rim+ (majority vote)",
        "n_rim_expert": "Lesions labelled rim+ in the input label TSV (n/a without labels)",
    }
    _write_json(out_dir / "scans.json", {
        "participant_id": {"Description": "Subject"},
        "session_id": {"Description": "Session (n/a for a scan without ses-)"},
        "scan": {"Description": "The scan's BIDS entities, the prefix of its files"},
        "lesions_tsv": {"Description": "The scan's lesion table, relative to this folder"},
        **{k: {"Description": v} for k, v in counts.items()},
    })  # fmt: skip
    _write_json(part_path.with_suffix(".json"), {
        "n_scans": {"Description": "Scans of the subject in scans.tsv (sessions, acquisitions, runs)"},
        **{k: {"Description": f"{v}: the largest over the subject's scans"} for k, v in counts.items()},
    })  # fmt: skip


def _write_review_page(out_dir: Path, result: SubjectResult, vol: SubjectVolumes, info: ModelInfo) -> Path:
    """The scan's review page (``<out>/sub-<scan>.html``), read back from the lesion TSV and its JSON sidecar
    just written, so the page shows exactly what they say (review column, QC entries, thresholds used)."""
    return write_review_page(result.files["lesions"], render_thumbnails(vol), out_dir, n_members=info.members,
                             model=f"{info.name} version {info.version or 'n/a'}")  # fmt: skip


# -- provenance -------------------------------------------------------------------------------------------


def _dataset_description(model: RimModel, source: Path, thresholds: dict[str, Any]) -> dict[str, Any]:
    info = model.info
    commit = git_commit()
    return {
        "Name": "qsmrim paramagnetic rim lesion predictions",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "qsmrim",
                "Version": __version__,
                "Description": f"qsmrim predict with model {info.name} version {info.version or 'n/a'} ({info.uri})",
                "GitCommit": commit,
                "Model": {
                    "Name": info.name,
                    "Version": info.version,
                    "Alias": info.alias,
                    "URI": info.uri,
                    "Members": info.members,
                    "ExecutionProvider": info.provider,
                    "TrainingGitCommit": info.metadata.get("git_commit"),
                    "ScreeningThreshold": thresholds["screening"]["value"],
                    "ScreeningThresholdSource": thresholds["screening"]["source"],
                },
            }
        ],
        "SourceDatasets": [{"URL": source.resolve().as_uri()}],
    }


def _check_same_model(out_dir: Path, description: dict[str, Any]) -> None:
    path = out_dir / "dataset_description.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["GeneratedBy"][0]["Model"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise ValueError(
            f"{out_dir} holds a dataset that qsmrim predict did not write; choose another --out"
        ) from None
    new = description["GeneratedBy"][0]["Model"]
    if (old.get("URI"), old.get("Version")) != (new["URI"], new["Version"]):
        raise ValueError(
            f"{out_dir} holds predictions of model {old.get('URI')} version {old.get('Version')}, not "
            f"{new['URI']} version {new['Version']}; choose another --out so one dataset never mixes models"
        )
    if "ScreeningThreshold" in old and old["ScreeningThreshold"] != new["ScreeningThreshold"]:
        raise ValueError(
            f"{out_dir} holds review flags at screening threshold {old['ScreeningThreshold']}, not "
            f"{new['ScreeningThreshold']}; choose another --out so one dataset's review column means one thing"
        )
