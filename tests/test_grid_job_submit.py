"""Cluster submission: `ray start --head` on 127.0.0.1, `ray job submit` of the grid job, MLflow runs checked.

This module runs after test_grid.py (alphabetical order) so its `ray stop` meets no in-process Ray.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

mlflow = pytest.importorskip("mlflow")

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_head(tmp_path):
    """A real single-node Ray cluster started with `ray start --head`, stopped afterwards."""
    port, dash = _free_port(), _free_port()
    # Token auth off for this throwaway loopback cluster: whether `ray start` turns it on depends on what an
    # earlier Ray left in ~/.ray, and the CLI then needs the same mode to submit.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    res = _ray("start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
               "--disable-usage-stats", env=env)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        _ray("stop", "--force", env=env, timeout=120)


def test_ray_job_submit_runs_the_grid(ray_head, tmp_path):
    """Check that `ray job submit ... -- python -m jobs.train_grid --config ci.yaml` succeeds and logs MLflow runs."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    runs = tmp_path / "runs"
    env = {**ray_head["env"], "RAY_ADDRESS": ray_head["address"]}
    runtime_env = f'{{"env_vars": {{"MLFLOW_TRACKING_URI": "{uri}"}}}}'
    cmd = ["job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO),
           "--runtime-env-json", runtime_env, "--",
           "python", "-m", "jobs.train_grid", "--config", "platform/experiments/ci.yaml",
           "--set", f"runs_dir={runs}", "--set", "training.epochs=1", "--no-progress",
           "--set", "grid.stack_seeds=false"]  # one trial per member here; test_grid covers stacked trials  # fmt: skip
    t = time.monotonic()
    res = _ray(*cmd, env=env, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-4000:]
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("qsmrim-ci")
    grid_runs = client.search_runs([exp.experiment_id], filter_string="tags.`qsmrim.kind` = 'grid'")
    assert len(grid_runs) == 1 and grid_runs[0].info.status == "FINISHED"
    members = client.search_runs([exp.experiment_id], filter_string="tags.`qsmrim.kind` = 'member'")
    assert len(members) == 4 and {m.info.status for m in members} == {"FINISHED"}
    assert len(list((runs / "ci").glob("qsmrimnet/fold_*/seed_*/member.json"))) == 4
    print(f"job submission round trip: {time.monotonic() - t:.0f} s")
    shutil.rmtree(runs, ignore_errors=True)
