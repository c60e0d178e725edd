"""Subject-level stratified K-fold splits, made once and written to ``splits.json`` (nnU-Net style).

Strata follow the paper (section 2.3): subjects with 0, 1-3, 4-6 and more than 6 rim+ lesions. Within each
stratum the sorted subject ids are shuffled with ``seed`` and dealt round-robin to the folds, continuing the
deal across strata so fold sizes stay balanced. Splits are data, not code: an existing ``splits.json`` is
used as it is, so users can supply their own.

The ids split are scan ids (:mod:`qsmrim.data.bids`: ``01``, ``01_ses-02``), but the deal is by subject: all
scans of a subject land in one fold, so a test fold never holds a session of a subject the model trained on
(the same lesions, imaged again). A subject's rim+ count is the largest over its scans: sessions image the
same lesions, so a sum would count them twice. A cohort of one scan per subject splits exactly as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qsmrim.atomic import write_text_atomic
from qsmrim.data.bids import participant_of

__all__ = ["RIM_COUNT_BINS", "rim_count_stratum", "make_splits", "load_or_make_splits", "subject_rim_counts",
           "write_splits"]

log = logging.getLogger(__name__)

RIM_COUNT_BINS: tuple[int, ...] = (0, 1, 4, 7)
"""Lower edges of the strata: 0, 1-3, 4-6, >6 rim+ lesions per subject (paper section 2.3)."""


def rim_count_stratum(n_rim_pos: int) -> int:
    """Stratum index (0..3) of a subject with ``n_rim_pos`` rim+ lesions."""
    if n_rim_pos < 0:
        raise ValueError(f"n_rim_pos must be >= 0, not {n_rim_pos}")
    return int(np.searchsorted(RIM_COUNT_BINS, n_rim_pos, side="right") - 1)


def subject_rim_counts(rim_counts: Mapping[str, int]) -> dict[str, int]:
    """Per-scan rim+ counts -> per-subject counts (the largest over each subject's scans)."""
    out: dict[str, int] = {}
    for scan, count in rim_counts.items():
        sub = participant_of(scan)
        out[sub] = max(out.get(sub, 0), int(count))
    return out


def make_splits(rim_counts: Mapping[str, int], n_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified subject-level folds of scans: ``[{"train": [...], "test": [...]}, ...]`` (ids sorted).

    ``rim_counts`` maps scan id to its rim+ count; every scan of a subject lands in the same fold.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, not {n_folds}")
    per_subject = subject_rim_counts(rim_counts)
    if len(per_subject) < n_folds:
        raise ValueError(f"need at least n_folds={n_folds} subjects to split, got {len(per_subject)}")
    scans_of: dict[str, list[str]] = {}
    for scan in rim_counts:
        scans_of.setdefault(participant_of(scan), []).append(scan)
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    deal = 0
    for stratum in range(len(RIM_COUNT_BINS)):
        members = sorted(s for s, c in per_subject.items() if rim_count_stratum(c) == stratum)
        for sub in rng.permutation(np.array(members, dtype=object)).tolist() if members else []:
            folds[deal % n_folds] += scans_of[sub]
            deal += 1
    everyone = sorted(rim_counts)
    return [{"train": sorted(set(everyone) - set(f)), "test": sorted(f)} for f in folds]


def write_splits(path: str | Path, splits: Sequence[Mapping[str, Sequence[str]]]) -> Path:
    """Write splits as JSON (atomically)."""
    return write_text_atomic(path, json.dumps([{"train": list(s["train"]), "test": list(s["test"])} for s in splits], indent=1))


def _check(splits: list, subjects: set[str], path: Path) -> None:
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "test"} <= set(s) for s in splits):
        raise ValueError(f"{path}: expected a list of {{'train': [...], 'test': [...]}} objects")
    tests = [set(s["test"]) for s in splits]
    seen: set[str] = set()
    for k, t in enumerate(tests):
        if seen & t:
            raise ValueError(f"{path}: fold {k} repeats test subject(s) {sorted(seen & t)[:5]} of another fold")
        seen |= t
        if set(splits[k]["train"]) & t:
            raise ValueError(f"{path}: fold {k} has subject(s) in both train and test")
    fold_of: dict[str, int] = {}
    for k, t in enumerate(tests):
        for scan in sorted(t):
            sub = participant_of(scan)
            if fold_of.setdefault(sub, k) != k:
                raise ValueError(f"{path}: subject sub-{sub} has scans in the test sets of folds {fold_of[sub]} "
                                 f"and {k} (e.g. {scan}); all sessions of a subject must share a fold")  # fmt: skip
    if seen != subjects:
        missing, extra = sorted(subjects - seen), sorted(seen - subjects)
        raise ValueError(f"{path}: splits do not match the cohort (missing {missing[:5]}, unknown {extra[:5]}); "
                         "delete the file to make new splits")  # fmt: skip


def load_or_make_splits(path: str | Path, rim_counts: Mapping[str, int], n_folds: int = 5, seed: int = 0) -> list[dict]:
    """Use ``path`` if it exists (checked against the cohort), else make stratified splits and write them."""
    path = Path(path)
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        _check(splits, set(rim_counts), path)
        log.info("using existing splits %s", path)
        return splits
    splits = make_splits(rim_counts, n_folds, seed)
    write_splits(path, splits)
    return splits
