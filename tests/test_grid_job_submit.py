"""Cluster submission: `ray start --head` on 127.0.0.1, `ray job submit` of the grid job, MLflow runs checked.

The cluster lives in its own temp dir and is stopped by its own processes (the `ray start --block` leader,
then anything left whose command line names that temp dir): `ray stop --force` would also kill every other
Ray of the user on the machine, a running grid or `qsmrim serve` included.
"""

from __future__ import annotations

import contextlib
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


def _own_processes(leader: int, temp_dir: str) -> list:
    """The leader's process tree plus every process whose command line names ``temp_dir`` (Ray's daemons and
    workers pass it on; some are re-parented away from the leader)."""
    import psutil

    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(leader)
        found = {p.pid: p for p in [top, *top.children(recursive=True)]}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            found.setdefault(proc.info["pid"], proc)
            with contextlib.suppress(psutil.NoSuchProcess):
                found.update({c.pid: c for c in proc.children(recursive=True)})
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_own_cluster(leader: subprocess.Popen, temp_dir: str) -> list:
    """SIGTERM the `ray start --block` leader (it stops what it started), then SIGKILL our leftovers only;
    returns what was still alive after the SIGKILL (expected: nothing)."""
    import psutil

    procs = _own_processes(leader.pid, temp_dir)
    leader.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(timeout=60)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive + _own_processes(leader.pid, temp_dir):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=15)
    return alive


@pytest.fixture
def ray_head(tmp_path):
    """A real single-node Ray cluster (`ray start --head --block` in its own temp dir), stopped afterwards
    by its own processes only."""
    port, dash, agent = _free_port(), _free_port(), _free_port()  # agent: 52365 may be another Ray's
    # Token auth off for this throwaway loopback cluster: whether `ray start` turns it on depends on what an
    # earlier Ray left in ~/.ray, and the CLI then needs the same mode to submit.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="qsmrim-rayjob-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # a bystander that looks like someone else's Ray worker: it must outlive our teardown
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "ray::IDLE", "default_worker.py"])
    log = open(tmp_path / "ray-start.log", "wb")  # closed below
    leader = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while _ray("job", "list", "--address", f"http://127.0.0.1:{dash}", env=env, timeout=60).returncode != 0:
            if leader.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed:\n{(tmp_path / 'ray-start.log').read_text()[-4000:]}")
            time.sleep(1)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        left = _stop_own_cluster(leader, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        spared = bystander.poll() is None
        bystander.kill()
        bystander.wait()
        assert not left, f"processes of the test cluster survived SIGKILL: {[p.pid for p in left]}"
        assert spared, "the teardown killed a process it did not start"


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
    while True:  # the head's job agent registers a little after the dashboard answers; Ray says: try again later
        res = _ray(*cmd, env=env, timeout=1200)
        out = res.stdout + res.stderr
        if res.returncode == 0 or "No available agent" not in out or time.monotonic() - t > 120:
            break
        time.sleep(2)
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
