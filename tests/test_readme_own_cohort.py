"""The README's own command sequences, run as written in a fresh project folder (issue 19 items 5 and 6).

- "Train on your own cohort": the section's bash block line by line, its three variables pointed at a small
  synthetic BIDS root and the tiny ``ci.yaml``; it ends with ``qsmrim serve --model models:/qsmrim@champion``.
- The quick start: ``qsmrim demo`` (what ``make demo`` runs, on ``ci.yaml``), then the same ``qsmrim serve`` with
  no other flag. Both servers must answer over HTTP: every command found the one store (``./mlruns.db``).

The project folder holds ``.venv`` (a link to this checkout's) and a copy of ``platform/`` whose
``serve.yaml`` listens on a free port instead of 8000, so the commands run unchanged beside other tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SECTION = "## Train on your own cohort"
SERVE = ".venv/bin/qsmrim serve --model models:/qsmrim@champion"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_block(title: str) -> list[str]:
    """The lines of the first ```bash block after the heading ``title``."""
    text = (REPO / "README.md").read_text()
    assert title in text, f"README.md has no section {title!r}"
    block = re.search(r"```bash\n(.*?)```", text[text.index(title):], re.S)
    assert block, f"README.md: no bash block under {title!r}"
    return block.group(1).splitlines()


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).strip()


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict[str, str], int]:
    """A folder like a checkout: .venv, platform/ (serve.yaml on a free port); its env has no store set."""
    root = tmp_path / "project"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    shutil.copytree(REPO / "platform", root / "platform")
    port = _free_port()
    serve_yaml = root / "platform" / "serve.yaml"
    text, n = re.subn(r"(?m)^(\s+port:\s*)8000\b", rf"\g<1>{port}", serve_yaml.read_text())
    assert n == 1, "platform/serve.yaml: expected one 'port: 8000' line"
    serve_yaml.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)  # the checkout's sources, as `pip install -e .` gives them
    return root, env, port


def _run(line: str, cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{line}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _serve_and_ask(line: str, cwd: Path, env: dict[str, str], port: int, timeout_s: float = 400) -> dict:
    """Start ``line`` (a qsmrim serve command), wait for /healthz, return GET /v1/model; stop it (this pid only)."""
    log = cwd / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"{line} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{line}: not healthy in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}"
            time.sleep(1.0)
        r = httpx.get(f"{url}/v1/model", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()
    finally:
        proc.send_signal(signal.SIGINT)  # qsmrim serve shuts Serve and its own Ray down on SIGINT
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started, nothing else
            proc.wait(timeout=30)


def test_readme_own_cohort_section_runs_as_written(project):
    """Check that the README's walk-through (validate, grid --data, evaluate, export, predict, serve) runs on a
    BIDS root with ci.yaml and that the served model is the version the walk-through registered."""
    root, env, port = project
    lines = [_strip_comment(x) for x in readme_block(SECTION)]
    lines = [x for x in lines if x]
    assignments = {"DATA": str(root / "my-bids"), "CONFIG": "platform/experiments/ci.yaml", "RUN": "runs/ci"}
    assert [x.split("=", 1)[0] for x in lines[:3]] == list(assignments), lines[:3]
    assert lines[-1] == SERVE, lines[-1]
    # the user's cohort: a BIDS root written by the synthesizer with ci.yaml's settings (6 subjects, 2 folds)
    _run(f".venv/bin/qsmrim synth {assignments['DATA']} --subjects 6 --seed 7 --shape 96 96 24", root, env)
    prefix = "".join(f"{k}={v!r}; " for k, v in assignments.items())
    for line in lines[3:-1]:
        assert line.startswith(".venv/bin/qsmrim "), line
        res = _run(prefix + line, root, env)
        if " evaluate " in line:  # the report's metrics reach the grid's MLflow run in the same store
            assert "logged to grid run" in res.stdout and f"sqlite:///{root.resolve() / 'mlruns.db'}" in res.stdout
    assert (root / "runs/ci/evaluation/report.html").is_file()
    assert (root / "runs/ci/export/model.onnx").is_file()
    assert list((root / "runs/ci/predictions").rglob("*.tsv")), "predict wrote no lesion table"
    assert (root / "mlruns.db").is_file() and (root / "mlartifacts").is_dir()
    assert not (root / "mlflow.db").exists(), "a command fell back to MLflow's own default store"
    info = _serve_and_ask(lines[-1], root, env, port)
    assert str(info.get("version")) == "1" and info.get("alias") == "champion", info


def test_demo_then_serve_champion_without_flags(project):
    """Check the quick start: `qsmrim demo` (ci.yaml) then `qsmrim serve --model models:/qsmrim@champion`
    answers over HTTP from the store the demo wrote, and the demo says which version holds @champion and why."""
    root, env, port = project
    res = _run(".venv/bin/qsmrim demo --config platform/experiments/ci.yaml", root, env)
    assert "@champion: moved to version 1 (no @champion yet)" in res.stdout, res.stdout[-3000:]
    assert f"sqlite:///{root.resolve() / 'mlruns.db'}" in res.stdout
    info = _serve_and_ask(SERVE, root, env, port)
    assert str(info.get("version")) == "1" and info.get("alias") == "champion", info
    assert not (root / "mlflow.db").exists()
