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
