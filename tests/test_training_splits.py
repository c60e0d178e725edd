"""Subject-level stratified splits (paper 2.3) written once and reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsmrim.training.splits import load_or_make_splits, make_splits, rim_count_stratum


@pytest.mark.parametrize("count, stratum", [(0, 0), (1, 1), (3, 1), (4, 2), (6, 2), (7, 3), (17, 3)])
def test_rim_count_stratum_bins(count, stratum):
    """Check the paper's bins: 0, 1-3, 4-6, >6 rim+ lesions."""
    assert rim_count_stratum(count) == stratum


def _counts(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return {f"{i:03d}": int(rng.choice([0, 0, 0, 1, 2, 3, 5, 9])) for i in range(n)}


def test_splits_partition_subjects_and_balance_strata():
    """Check that every subject is in exactly one test fold, never in its own training set, and strata balance."""
    counts = _counts()
    splits = make_splits(counts, n_folds=5, seed=0)
    tests = [set(s["test"]) for s in splits]
    assert set().union(*tests) == set(counts)
    assert sum(len(t) for t in tests) == len(counts)
    for s in splits:
        assert not set(s["train"]) & set(s["test"])
        assert set(s["train"]) | set(s["test"]) == set(counts)
    for stratum in range(4):
        per_fold = [sum(rim_count_stratum(counts[x]) == stratum for x in t) for t in tests]
        assert max(per_fold) - min(per_fold) <= 1
    assert max(len(t) for t in tests) - min(len(t) for t in tests) <= 1


def test_splits_are_deterministic_and_seeded():
    """Check that the same seed repeats the splits and another seed changes them."""
    counts = _counts()
    assert make_splits(counts, 5, 3) == make_splits(counts, 5, 3)
    assert make_splits(counts, 5, 3) != make_splits(counts, 5, 4)


def test_splits_file_is_written_once_and_reused(tmp_path):
    """Check that an existing splits.json is used as is (users may supply their own)."""
    counts = _counts(10)
    path = tmp_path / "splits.json"
    first = load_or_make_splits(path, counts, 5, 0)
    custom = [{"train": sorted(set(counts) - set(f["test"])), "test": f["test"]} for f in reversed(first)]
    path.write_text(json.dumps(custom))
    assert load_or_make_splits(path, counts, 5, 99) == custom


def test_splits_file_that_does_not_match_cohort_is_refused(tmp_path):
    """Check that a splits.json naming other subjects fails with a message naming the file."""
    path = tmp_path / "splits.json"
    load_or_make_splits(path, _counts(10), 5, 0)
    with pytest.raises(ValueError, match="splits.json: splits do not match the cohort"):
        load_or_make_splits(path, _counts(12), 5, 0)


def _sessions(counts: dict[str, int], n_sessions: int = 3, seed: int = 0) -> dict[str, int]:
    """Scan ids ``<sub>_ses-<k>`` whose rim+ counts vary by session but never exceed the subject's count."""
    rng = np.random.default_rng(seed)
    scans = {}
    for sub, c in counts.items():
        drawn = [int(rng.integers(0, c + 1)) for _ in range(n_sessions - 1)] + [c]
        for k, v in enumerate(rng.permutation(drawn).tolist(), start=1):
            scans[f"{sub}_ses-{k:02d}"] = v
    return scans


def test_splits_keep_every_session_of_a_subject_in_one_fold():
    """Check that all sessions of a subject share a test fold and never sit in train and test of one fold."""
    scans = _sessions(_counts(30), n_sessions=3)
    splits = make_splits(scans, n_folds=5, seed=0)
    fold_of = {}
    for k, s in enumerate(splits):
        assert set(s["train"]) | set(s["test"]) == set(scans)
        subjects_train = {x.split("_")[0] for x in s["train"]}
        subjects_test = {x.split("_")[0] for x in s["test"]}
        assert not subjects_train & subjects_test
        for scan in s["test"]:
            assert fold_of.setdefault(scan.split("_")[0], k) == k
    assert len(fold_of) == 30


def test_session_splits_deal_subjects_as_a_subject_only_cohort_of_their_largest_count():
    """Check that sessions are stratified by the subject's rim+ count (its largest over sessions): projected to
    subjects, the folds equal those of a one-scan-per-subject cohort with those counts."""
    counts = _counts(40, seed=3)
    scans = _sessions(counts, n_sessions=2, seed=1)
    projected = [sorted({x.split("_")[0] for x in s["test"]}) for s in make_splits(scans, 5, 7)]
    assert projected == [s["test"] for s in make_splits(counts, 5, 7)]


def test_subject_only_ids_split_as_before():
    """Check that a cohort without sessions gets the splits this seed always gave (frozen reference)."""
    counts = {f"{i:03d}": c for i, c in enumerate([0, 0, 1, 2, 5, 9, 0, 3, 0, 4])}
    assert [s["test"] for s in make_splits(counts, 3, 0)] == FROZEN_SUBJECT_ONLY


def test_splits_file_that_splits_a_subject_across_folds_is_refused(tmp_path):
    """Check that a user's splits.json putting two sessions of one subject in different folds is refused."""
    scans = {f"{s}_ses-{k}": 1 for s in ("01", "02", "03") for k in (1, 2)}
    leaky = [
        {"test": ["01_ses-1", "02_ses-1", "02_ses-2"], "train": ["01_ses-2", "03_ses-1", "03_ses-2"]},
        {"test": ["01_ses-2", "03_ses-1", "03_ses-2"], "train": ["01_ses-1", "02_ses-1", "02_ses-2"]},
    ]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(leaky))
    with pytest.raises(ValueError, match=r"splits.json: subject sub-01 has scans in the test sets of folds 0 and 1"):
        load_or_make_splits(path, scans, 2, 0)


FROZEN_SUBJECT_ONLY = [["002", "005", "006", "008"], ["000", "004", "007"], ["001", "003", "009"]]
"""What make_splits gave before sessions existed (git show 0e31347~1:qsmrim/training/splits.py)."""


def test_inner_split_keeps_sessions_together_and_counts_subjects():
    """Check that the inner validation split groups sessions by subject, and that a fold with more scans than
    inner folds but fewer subjects trains on all of them instead of failing."""
    from qsmrim.training.fit import inner_split

    two_subjects = {f"{s}_ses-{k}": 1 for s in ("01", "02") for k in (1, 2)}
    assert inner_split(two_subjects, 0.34, 0) == (sorted(two_subjects), [])
    scans = _sessions(_counts(12, seed=5), n_sessions=2)
    fit, val = inner_split(scans, 0.34, 0)
    assert val and not {x.split("_")[0] for x in fit} & {x.split("_")[0] for x in val}
    assert sorted(fit + val) == sorted(scans)
