"""Subject-level stratified K-fold splits, made once and written to ``splits.json`` (nnU-Net style).

Strata follow the paper (section 2.3): subjects with 0, 1-3, 4-6 and more than 6 rim+ lesions. Within each
stratum the sorted subject ids are shuffled with ``seed`` and dealt round-robin to the folds, continuing the
deal across strata so fold sizes stay balanced. Splits are data, not code: an existing ``splits.json`` is
used as it is, so users can supply their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["RIM_COUNT_BINS", "rim_count_stratum", "make_splits", "load_or_make_splits", "write_splits"]

log = logging.getLogger(__name__)

RIM_COUNT_BINS: tuple[int, ...] = (0, 1, 4, 7)
"""Lower edges of the strata: 0, 1-3, 4-6, >6 rim+ lesions per subject (paper section 2.3)."""


def rim_count_stratum(n_rim_pos: int) -> int:
    """Stratum index (0..3) of a subject with ``n_rim_pos`` rim+ lesions."""
    if n_rim_pos < 0:
        raise ValueError(f"n_rim_pos must be >= 0, not {n_rim_pos}")
    return int(np.searchsorted(RIM_COUNT_BINS, n_rim_pos, side="right") - 1)


def make_splits(rim_counts: Mapping[str, int], n_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Stratified subject-level folds: ``[{"train": [...], "test": [...]}, ...]`` (ids sorted)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, not {n_folds}")
    if len(rim_counts) < n_folds:
        raise ValueError(f"need at least n_folds={n_folds} subjects to split, got {len(rim_counts)}")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    deal = 0
    for stratum in range(len(RIM_COUNT_BINS)):
        members = sorted(s for s, c in rim_counts.items() if rim_count_stratum(int(c)) == stratum)
        for sid in rng.permutation(np.array(members, dtype=object)).tolist() if members else []:
            folds[deal % n_folds].append(sid)
            deal += 1
    everyone = sorted(rim_counts)
    return [{"train": sorted(set(everyone) - set(f)), "test": sorted(f)} for f in folds]


def write_splits(path: str | Path, splits: Sequence[Mapping[str, Sequence[str]]]) -> Path:
    """Write splits as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps([{"train": list(s["train"]), "test": list(s["test"])} for s in splits], indent=1))
    tmp.replace(path)
    return path


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
