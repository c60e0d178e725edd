"""Shared fixtures: one small synthetic cohort per test session, built with the real generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qsmrim.data import synthesize_cohort

REPO = Path(__file__).resolve().parents[1]
SMALL_SHAPE = (96, 96, 24)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A 4-subject synthetic BIDS cohort (read-only: copy it before changing anything)."""
    return synthesize_cohort(tmp_path_factory.mktemp("synth") / "cohort", 4, seed=0, shape=SMALL_SHAPE)


@pytest.fixture
def cohort_copy(synth_root, tmp_path) -> Path:
    """A private, writable copy of the synthetic cohort."""
    dst = tmp_path / "cohort"
    shutil.copytree(synth_root, dst)
    return dst
