"""Shared fixtures: one small synthetic cohort per test session, built with the real generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qsmrim.data import synthesize_cohort

REPO = Path(__file__).resolve().parents[1]

_MISSING = ("pip install -e '.[test]' for Python packages, bash .ci/install-system-deps.sh for system ones "
            "(PostgreSQL server binaries, checkov)")  # fmt: skip


def _as_failure(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped, which this suite counts as a failure: {reason}\nInstall what is missing: {_MISSING}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips (a missing package, server or tool) fails instead: a green run proves every test ran."""
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        _as_failure(report, report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at import (``pytest.importorskip`` at module level)."""
    report = (yield).get_result()
    if report.skipped:
        _as_failure(report, report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr))
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


@pytest.fixture(scope="session")
def dataset(synth_root, tmp_path_factory):
    """The synthetic cohort as a training dataset, with 6 made-up radiomic features that carry the label."""
    import numpy as np

    from qsmrim.data import PatchSpec, build_lesion_table, build_patch_cache, discover_cohort
    from qsmrim.training import LesionDataset

    cohort = discover_cohort(synth_root)
    table = build_lesion_table(cohort)
    patches = build_patch_cache(cohort, table, tmp_path_factory.mktemp("prep"), PatchSpec())
    rng = np.random.default_rng(0)
    names = tuple(f"f{i}" for i in range(6))
    feats = table[["subject", "lesion"]].copy()
    for i, n in enumerate(names):
        feats[n] = rng.normal(size=len(table)) + (table["rim"].astype(float).to_numpy() * (i + 1))
    feats.loc[0, "f0"] = np.nan
    return LesionDataset.from_tables(table, patches, feats, names)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite file: copying it gives each test a fresh store without re-migrating."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, migrated_db) -> str:
    """A fresh sqlite tracking/registry store with artifacts under tmp_path; fails a test that leaks a run."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    shutil.copy(migrated_db, tmp_path / "mlruns.db")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    MlflowClient(uri).create_experiment("qsmrim-models", artifact_location=(tmp_path / "artifacts").as_uri())
    with _use_tracking_uri(uri):
        yield uri
        leaked = mlflow.active_run()
        if leaked is not None:
            mlflow.end_run()
    assert leaked is None, f"test left MLflow run {leaked.info.run_id} active"


@pytest.fixture(scope="module")
def arrays(synth_root):
    """Patches and raw radiomics of every lesion of the synthetic cohort (the serving tests' inputs)."""
    from test_serving_model import cohort_arrays

    return cohort_arrays(synth_root)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, arrays) -> Path:
    """A 5-member logistic ensemble graph over ``arrays`` (fast to build; the real exported graph has its own test)."""
    from test_serving_model import build_tiny_ensemble

    return build_tiny_ensemble(tmp_path_factory.mktemp("model") / "model.onnx", *arrays)
