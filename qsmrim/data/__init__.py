"""Cohort ingestion, validation, lesion tables, patches and the synthetic cohort (no Ray/Dask/MLflow)."""

from qsmrim.data.bids import LesionSource, participant_of, scan_folder, session_of
from qsmrim.data.cohort import (
    Cohort,
    SubjectFiles,
    SubjectVolumes,
    discover_cohort,
    load_subject,
    read_labels,
    scan_cohort,
)
from qsmrim.data.errors import InputError, Problem
from qsmrim.data.fingerprint import file_digest, fingerprint
from qsmrim.data.lesions import LESION_TABLE_COLUMNS, ValidationReport, build_lesion_table, validate_cohort
from qsmrim.data.nifti_io import read_canonical, write_nifti
from qsmrim.data.patches import PatchSpec, build_patch_cache, extract_patches, load_patch_cache
from qsmrim.data.synth import SynthConfig, synthesize_cohort

__all__ = [
    "Cohort",
    "LesionSource",
    "participant_of",
    "scan_folder",
    "session_of",
    "SubjectFiles",
    "SubjectVolumes",
    "discover_cohort",
    "scan_cohort",
    "load_subject",
    "read_labels",
    "InputError",
    "Problem",
    "file_digest",
    "fingerprint",
    "LESION_TABLE_COLUMNS",
    "ValidationReport",
    "build_lesion_table",
    "validate_cohort",
    "read_canonical",
    "write_nifti",
    "PatchSpec",
    "build_patch_cache",
    "extract_patches",
    "load_patch_cache",
    "SynthConfig",
    "synthesize_cohort",
]
