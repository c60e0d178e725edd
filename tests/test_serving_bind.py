"""What a started ``qsmrim serve`` listens on, read from the real sockets of its process tree (psutil).

The server runs as its own process with its own Ray, and is stopped by its own process id: nothing else
on the machine is touched.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serving_model import build_tiny_ensemble, cohort_arrays

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listeners(procs) -> list[tuple[str, str, int]]:
    import psutil

    out = []
    for proc in procs:
        try:
            name = " ".join(proc.cmdline()) or proc.name()  # whole: a deep checkout path pushes the script name far right
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    out.append((name, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_loopback


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_root):
    """``qsmrim serve`` on a free loopback port, from an empty folder (built-in defaults); yields its processes."""
    psutil = pytest.importorskip("psutil")
    model = build_tiny_ensemble(tmp_path_factory.mktemp("bind") / "model.onnx", *cohort_arrays(synth_root))
    port = _free_port()
    cwd = tmp_path_factory.mktemp("cwd")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log = open(cwd / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsmrim", "serve", "--model", str(model), "--port", str(port)],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    tree: list = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, (cwd / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("qsmrim serve did not become healthy: " + (cwd / "serve.log").read_text()[-3000:])
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        yield port, tree
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in tree[1:]:  # only the processes this server started
            try:
                p.wait(timeout=10)
            except psutil.TimeoutExpired:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()


def test_serve_http_and_dashboard_stay_on_loopback(served):
    """Check the HTTP API listens on 127.0.0.1 only and no dashboard or job-submission API is started."""
    port, tree = served
    listeners = _listeners(tree)
    http = [(ip, p) for _, ip, p in listeners if p == port]
    assert http and all(_is_loopback(ip) for ip, _ in http), http
    assert not [entry for entry in listeners if entry[2] == 8265], listeners  # Ray's job API
    with pytest.raises(httpx.HTTPError):
        httpx.get("http://127.0.0.1:8265/api/jobs/", timeout=3).raise_for_status()


def test_serve_lists_which_ray_ports_are_reachable_beyond_loopback(served):
    """Check that every listener on a non-loopback address is one of Ray's own core processes (GCS, raylet,
    agents, workers: token-authenticated gRPC, which Ray 2.60 cannot bind to loopback), never the HTTP API."""
    port, tree = served
    exposed = [entry for entry in _listeners(tree) if not _is_loopback(entry[1])]
    core = ("gcs_server", "raylet", "ray::", "dashboard", "autoscaler/_private/monitor", "log_monitor", "-m qsmrim serve")
    unexpected = [e for e in exposed if e[2] == port or not any(k in e[0] for k in core)]
    assert not unexpected, unexpected
