"""Packaging contracts of DESIGN §2: the CLI runs from the repo root and `platform` is not shadowed."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_help_runs_from_repo_root():
    """Check that `python -m qsmrim --help` works from the repo root and lists the commands."""
    res = _run("-m", "qsmrim", "--help")
    assert res.returncode == 0, res.stderr
    for command in ("synth", "validate", "lesions", "patches", "demo"):
        assert command in res.stdout


def test_stdlib_platform_is_not_shadowed():
    """Check that `import platform, torch, ray` from the repo root gets the standard library module."""
    res = _run("-c", "import platform, torch, ray; print(platform.__file__); print(platform.python_version())")
    assert res.returncode == 0, res.stderr
    assert "site-packages" not in res.stdout.splitlines()[0]
    assert str(REPO / "platform") not in res.stdout.splitlines()[0]
    assert not (REPO / "platform" / "__init__.py").exists()


def test_science_layer_imports_no_cluster_frameworks():
    """Check that importing the science packages leaves dask, ray and mlflow out of sys.modules."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import qsmrim\n"
        "for name in ('qsmrim.data', 'qsmrim.radiomics', 'qsmrim.models', 'qsmrim.evaluation'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name != name: raise\n"
        "bad = sorted(m for m in ('dask', 'distributed', 'ray', 'mlflow') if m in sys.modules)\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = _run("-c", code)
    assert res.returncode == 0, res.stdout + res.stderr


import pytest  # noqa: E402


@pytest.mark.parametrize("job", ["jobs.train_grid", "jobs.features", "jobs.pipeline"])
def test_job_bad_config_is_one_clear_error(job, tmp_path):
    """Check that a job given a config with a typo exits 1 with one message naming the file and key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining:\n  epochz: 3\n")
    res = _run("-m", job, "--config", str(bad))
    assert res.returncode == 1
    assert f"{bad}: training: unknown key(s) ['epochz']" in res.stderr
    assert "Traceback" not in res.stderr
