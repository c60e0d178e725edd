"""Dependencies that are true (issue 19 item 8).

- deptry: every import of the runtime code (qsmrim, serving, jobs) is a declared runtime dependency, none comes
  from the test extra, and nothing declared goes unused ([tool.deptry] in pyproject.toml).
- The wheel: built from this checkout, its own ``Requires-Dist`` (without extras) covers every third-party
  module its files import, so ``pip install qsmrim`` without extras can run ``qsmrim demo``.
- The lock: ``requirements/dev.lock`` pins every dependency of pyproject (runtime and test extra, torch aside)
  with hashes, within pyproject's ranges, and is what this environment has installed (``make setup`` installs
  from it); ray, mlflow, torch and onnxruntime have an upper bound on their major version.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = REPO / "requirements" / "dev.lock"
FIRST_PARTY = {"qsmrim", "serving", "jobs"}


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def _lock_pins() -> dict[str, tuple[str, int]]:
    """``{name: (version, number of hashes)}`` of the lock file."""
    text = LOCK.read_text()
    pins = {}
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if m:
            pins[canonicalize_name(m.group(1))] = (m.group(2), block.count("--hash=sha256:"))
    return pins


def test_deptry_finds_every_runtime_import_declared():
    """Check deptry reports no missing, transitive, misplaced (test-extra) or unused dependency."""
    exe = BIN / "deptry"
    assert exe.exists(), f"{exe} missing: install the test extra (`make setup`, or pip install 'deptry>=0.25')"
    res = subprocess.run([str(exe), ".", "--no-ansi"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _imported_modules(source: str) -> set[str]:
    """Top-level module names of every absolute import in ``source``, at any depth (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                          str(REPO)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = out.glob("qsmrim-*.whl")
    return whl


def test_wheel_requirements_cover_its_imports(wheel):
    """Check every third-party module imported by the wheel's files belongs to a distribution its Requires-Dist
    names without an extra (module -> distribution from this environment's installed metadata)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [Requirement(line.split(":", 1)[1].strip()) for line in z.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]  # fmt: skip
        sources = {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}
    runtime = {canonicalize_name(r.name) for r in requires if not (r.marker and "extra" in str(r.marker))}
    assert {"httpx", "pydantic", "starlette", "distributed"} <= runtime, sorted(runtime)
    assert {n.split("/")[0] for n in sources} == FIRST_PARTY, "the wheel should hold qsmrim, serving and jobs"
    providers = metadata.packages_distributions()
    missing = {}
    for name, src in sources.items():
        for mod in _imported_modules(src) - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}:
            dists = {canonicalize_name(d) for d in providers.get(mod, [])}
            if not dists & runtime:
                missing.setdefault(mod, []).append(name)
    assert not missing, f"imported but not a runtime requirement of the wheel: {missing}"


def test_upper_bounds_on_the_majors_of_the_platform_libraries():
    """Check ray, mlflow, torch and onnxruntime cannot move to a new major version unnoticed."""
    bounds = {canonicalize_name(r.name): r.specifier for r in _requirements()}
    for name in ("ray", "mlflow", "torch", "onnxruntime-gpu"):
        spec = bounds[name]
        uppers = [s for s in spec if s.operator == "<"]
        assert uppers, f"{name}: no upper bound in {spec}"
        installed = metadata.version(name).split("+")[0]
        assert installed in spec, f"{name} {installed} is outside {spec}"
        major = int(installed.split(".")[0])
        assert all(int(s.version.split(".")[0]) == major + 1 for s in uppers), f"{name}: {spec} is not '<next major'"


def test_lock_pins_every_dependency_with_hashes_within_pyproject():
    """Check requirements/dev.lock pins every runtime and test dependency (torch aside, TORCH_SPEC installs it)
    with hashes, inside pyproject's ranges, and that this environment runs exactly those versions."""
    pins = _lock_pins()
    assert "torch" not in pins, "torch is installed from TORCH_SPEC (CPU or CUDA build), not from the lock"
    for req in _requirements() + _requirements("test"):
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{req} is not in {LOCK.name}: run `make lock`"
        assert pins[name][0] in req.specifier, f"{LOCK.name} pins {name}=={pins[name][0]}, outside {req}"
    unhashed = [n for n, (_v, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"pins without --hash: {unhashed}"
    drift = {n: (v, metadata.version(n)) for n, (v, _h) in pins.items() if metadata.version(n) != v}
    assert not drift, f"installed versions differ from {LOCK.name} (lock, installed): {drift}"


def test_make_setup_installs_from_the_lock():
    """Check the Makefile's setup installs torch from TORCH_SPEC, then the lock with --require-hashes, then the
    project without dependencies, and rebuilds when the lock changes."""
    text = (REPO / "Makefile").read_text()
    rule = text[text.index("$(BIN)/.installed:"):text.index("setup: $(BIN)/.installed")]
    assert "$(LOCK)" in rule.splitlines()[0] and "LOCK := requirements/dev.lock" in text
    steps = [line.strip() for line in rule.splitlines()[1:] if line.strip()]
    torch = next(i for i, s in enumerate(steps) if '"$(TORCH_SPEC)"' in s)
    lock = next(i for i, s in enumerate(steps) if "--require-hashes --no-deps -r $(LOCK)" in s)
    project = next(i for i, s in enumerate(steps) if "--no-deps -e ." in s)
    assert torch < lock < project, steps
    assert any("pip check" in s for s in steps[project:]), steps
