"""Architecture contracts (docs/architecture.md): the import-linter contracts of pyproject.toml hold.

The contracts are the layers (entry points -> orchestration -> platform -> science), the ban on dask,
distributed, ray, mlflow and onnxruntime in the science packages (imports inside functions included) and
no import cycles between sibling modules. A second test proves the same runner fails on a broken contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("importlinter")

_LINT = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))\n"
)


def _lint(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", _LINT, str(config)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_architecture_contracts_are_kept():
    """Check that every import-linter contract of pyproject.toml is kept (layers, science bans, no cycles)."""
    res = _lint(REPO / "pyproject.toml", REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout
    for contract in ("never back up", "import no dask", "no import cycles"):
        assert contract in res.stdout


def test_architecture_contracts_fail_on_a_broken_contract(tmp_path):
    """Check that the runner exits 1 naming the import when science imports ray in a function or a layer points up."""
    pkg = tmp_path / "toy"
    (pkg / "science").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "platform_layer.py").write_text("import toy.science\n")
    (pkg / "science" / "__init__.py").write_text("")
    (pkg / "science" / "fit.py").write_text(
        "def fan_out():\n    import ray\n\n    return ray\n\n\ndef up():\n    import toy.platform_layer\n"
    )
    config = tmp_path / "pyproject.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_packages = ["toy"]
            include_external_packages = true

            [[tool.importlinter.contracts]]
            name = "toy layers"
            type = "layers"
            layers = ["toy.platform_layer", "toy.science"]

            [[tool.importlinter.contracts]]
            name = "toy science bans"
            type = "forbidden"
            source_modules = ["toy.science"]
            forbidden_modules = ["ray"]
            """
        )
    )
    res = _lint(config, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 broken" in res.stdout
    assert "toy.science.fit -> ray" in res.stdout
    assert "toy.science.fit -> toy.platform_layer" in res.stdout
