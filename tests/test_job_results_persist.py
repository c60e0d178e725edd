"""A job submitted as docs/deploy.md says keeps its results where the user asked (issue 19 item 7).

`ray start --head` from the venv (its PATH first, as `source .venv/bin/activate` leaves it) with its own
--temp-dir and ports, then `ray job submit --working-dir . -- python -m jobs.pipeline ... --base-dir "$PWD"`
from a project folder: the run folder, `mlruns.db` and the registered model must be in that folder, not in
Ray's temporary copy of it. The same job without --base-dir must refuse before writing. Only this test's Ray
is stopped: the processes whose command line names its temp dir, and their children (never `ray stop`, which
stops every Ray of the user on the machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
#: The local-cluster command of docs/deploy.md, word for word (the test checks the docs still say it).
DOCS_SUBMIT = ('ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\\n'
               '    python -m jobs.pipeline --config platform/experiments/ci.yaml --base-dir "$PWD"')  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names ``temp_dir``, with all their descendants."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def _stop_own_ray(temp_dir: Path) -> None:
    procs = _own_ray_processes(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head():
    """`ray start --head` as the docs say, from the venv's PATH, with its own temp dir and ports."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths live under it
    dash = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent),
               RAY_AUTH_MODE="disabled")  # a throwaway loopback cluster; ~/.ray's token state must not leak in  # fmt: skip
    ports = {f"--{name}": str(_free_port()) for name in (
        "port", "ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "runtime-env-agent-port")}  # fmt: skip
    cmd = ["ray", "start", "--head", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        yield {"dash": dash, "env": env, "temp_dir": temp_dir}
    finally:
        _stop_own_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def project(tmp_path) -> Path:
    """A checkout's sources and configs (what `--working-dir .` ships), without runs/ or a store."""
    root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("qsmrim", "serving", "jobs", "platform"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    return root


def _submit(command: str, ray_head: dict, cwd: Path) -> subprocess.CompletedProcess:
    command = command.replace("127.0.0.1:8265", f"127.0.0.1:{ray_head['dash']}")
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=ray_head["env"], capture_output=True, text=True,
                          timeout=1500)  # fmt: skip


def test_docs_state_the_tested_command():
    """Check docs/deploy.md shows the local-cluster command this file runs."""
    assert DOCS_SUBMIT in (REPO / "docs" / "deploy.md").read_text()


def test_submitted_pipeline_writes_runs_and_store_where_the_user_asked(ray_head, project):
    """Check a job without --base-dir refuses, and the documented one leaves runs/ci, mlruns.db and the registered
    @champion in the project folder, printing where they are."""
    mlflow = pytest.importorskip("mlflow")
    refused = _submit(DOCS_SUBMIT.replace(' --base-dir "$PWD"', ""), ray_head, project)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Ray deletes" in out and "--base-dir" in out, out[-4000:]
    assert not (project / "runs").exists() and not (project / "mlruns.db").exists()

    t = time.monotonic()
    res = _submit(DOCS_SUBMIT, ray_head, project)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and re.search(r"Job '\S+' succeeded", out), out[-4000:]
    assert f"run folder {project / 'runs' / 'ci'}" in out and f"sqlite:///{project / 'mlruns.db'}" in out, out[-4000:]
    assert (project / "runs/ci/export/model.onnx").is_file()
    assert len(list((project / "runs/ci").glob("qsmrimnet/fold_*/seed_*/member.json"))) == 4
    client = mlflow.tracking.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    grid = client.search_runs([client.get_experiment_by_name("qsmrim-ci").experiment_id],
                              filter_string="tags.`qsmrim.kind` = 'grid'")  # fmt: skip
    assert len(grid) == 1 and grid[0].info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("qsmrim", "champion").version) == "1"
    assert list((project / "mlartifacts").rglob("*.onnx")), "the model's files are not beside the store"
    copies = list(ray_head["temp_dir"].glob("session_*/runtime_resources/working_dir_files/*"))
    assert not [c for c in copies if (c / "runs").exists() or (c / "mlruns.db").exists()]
    print(f"job submission round trip: {time.monotonic() - t:.0f} s")
