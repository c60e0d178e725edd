"""MLflow on a real PostgreSQL: ``infra/mlflow/entrypoint.sh`` end to end over HTTP, no sqlite anywhere.

A PostgreSQL server (Debian's binaries, ``initdb`` into a temporary folder, 127.0.0.1 only, password
auth) and the MLflow server started by the very script the compose file and the Kubernetes Deployment run
(basic-auth on, secrets read from ``*_FILE`` files) live for this module; both are stopped in the
fixtures' finalizers. Clients authenticate through ``~/.mlflow/credentials``, as the Ray pods do.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "infra" / "mlflow" / "entrypoint.sh"
INITDB_SCRIPT = REPO / "infra" / "mlflow" / "initdb" / "10-create-auth-db.sh"
MODEL_NAME = "qsmrim-infra-test"
ADMIN = "admin"
SERVICE_USER = "qsmrim-pipeline"  # what the Ray pods log in as (infra/k8s: Secret qsmrim-mlflow-client)

pytestmark = pytest.mark.slow


# -- PostgreSQL ---------------------------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, else whatever ``pg_config``/PATH offers."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as ``postgres`` (created by the Debian package)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int):
    """``preexec_fn`` asking Linux to send ``sig`` when pytest dies, so a killed run leaks no server.

    Runs after Popen's setuid (prctl's setting survives the exec but not a later credential change).
    """

    def set_pdeathsig() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG

    return set_pdeathsig


@contextlib.contextmanager
def _environ(**values: str):
    """Set environment variables for a block (module-scoped fixtures cannot use monkeypatch)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(proc: subprocess.Popen, sig: int, timeout: float = 20.0) -> None:
    """Signal the process group ``proc`` leads, wait, then SIGKILL whatever is left of the group."""
    for s, wait in ((sig, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        break
    try:  # children that outlived the leader (server workers) are still in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 with databases ``mlflow`` and ``mlflow_auth``."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin or initdb on PATH); install "
                    "them with: bash .ci/install-system-deps.sh (as root or with passwordless sudo), or "
                    "apt-get install -y postgresql")  # fmt: skip
    import psycopg2  # psycopg2-binary, a test extra; the MLflow server needs it too

    user = _server_user()
    base = Path(tempfile.mkdtemp(prefix="qsmrim-pg-"))
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    (base / "pwfile").write_text(password + "\n")
    run_as = {}
    if user is not None:
        for path in (base, base / "pwfile"):
            os.chown(path, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    data = base / "data"
    subprocess.run(
        [bindir / "initdb", "-D", data, "-U", "qsmrim", f"--pwfile={base / 'pwfile'}", "--auth=scram-sha-256",
         "-E", "UTF8", "--no-locale", "--no-sync"],
        cwd=base, check=True, capture_output=True, **run_as,
    )  # fmt: skip
    port = _free_port()
    log = open(base / "postgres.log", "wb")  # closed in the finalizer
    proc = subprocess.Popen(
        [bindir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", base,
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        cwd=base, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_die_with_parent(signal.SIGINT), **run_as,
    )  # fmt: skip
    try:
        dsn = {"host": "127.0.0.1", "port": port, "user": "qsmrim", "password": password}
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg2.connect(dbname="postgres", connect_timeout=2, **dsn)
                break
            except psycopg2.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not start:\n{(base / 'postgres.log').read_text()[-3000:]}")
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")  # what the postgres image does for POSTGRES_DB
        conn.close()
        # The compose file's init script makes the basic-auth database, as on a fresh data volume.
        env = {**os.environ, "POSTGRES_USER": "qsmrim", "POSTGRES_DB": "mlflow", "PGHOST": "127.0.0.1",
               "PGPORT": str(port), "PGPASSWORD": password, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        subprocess.run(["sh", INITDB_SCRIPT], env=env, check=True, capture_output=True, timeout=60)
        yield {**dsn, "uri": f"postgresql+psycopg2://qsmrim:{password}@127.0.0.1:{port}"}
    finally:
        _stop(proc, signal.SIGINT)  # SIGINT: PostgreSQL's "fast" shutdown
        log.close()
        shutil.rmtree(base, ignore_errors=True)


# -- MLflow server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``infra/mlflow/entrypoint.sh`` on 127.0.0.1 against ``postgres``, basic-auth on; yields its details."""
    work = tmp_path_factory.mktemp("mlflow-server")
    secrets = work / "secrets"
    secrets.mkdir(mode=0o700)
    admin_password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    (secrets / "backend-store-uri").write_text(postgres["uri"] + "/mlflow")
    (secrets / "admin-password").write_text(admin_password)
    artifacts = work / "mlartifacts"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(work),
        TMPDIR=str(work),
        MLFLOW_BACKEND_STORE_URI_FILE=str(secrets / "backend-store-uri"),
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(secrets / "admin-password"),
        MLFLOW_AUTH_DATABASE_URI=postgres["uri"] + "/mlflow_auth",
        MLFLOW_FLASK_SERVER_SECRET_KEY=base64.urlsafe_b64encode(os.urandom(24)).decode(),
        MLFLOW_ARTIFACTS_DESTINATION=str(artifacts),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    log = open(work / "server.log", "wb")  # closed in the finalizer
    proc = subprocess.Popen(
        ["sh", ENTRYPOINT], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=_die_with_parent(signal.SIGTERM),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a ceiling for a busy machine; ~10 s when idle
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(work / 'server.log').read_text()[-5000:]}")
            time.sleep(0.25)
        # The documented way to give the pipeline its own account (infra/mlflow/README.md).
        from mlflow.server.auth.client import AuthServiceClient

        service_password = base64.urlsafe_b64encode(os.urandom(18)).decode()
        with _environ(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=admin_password):
            AuthServiceClient(url).create_user(SERVICE_USER, service_password)
        yield {"url": url, "work": work, "artifacts": artifacts, "admin_password": admin_password,
               "service_password": service_password}  # fmt: skip
    finally:
        _stop(proc, signal.SIGTERM)
        log.close()


@pytest.fixture
def tracking(mlflow_server, tmp_path, monkeypatch):
    """Point this test's MLflow client at the server, credentials in ``$HOME/.mlflow/credentials``."""
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {SERVICE_USER}\n"
        f"mlflow_tracking_password = {mlflow_server['service_password']}\n"
    )
    for name in list(os.environ):
        if name.startswith("MLFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.chdir(tmp_path)  # a stray local store (mlruns/, mlruns.db) would appear here
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # Also overrides a tracking URI another test set globally; restores the unset state afterwards.
    with tracking_utils._use_tracking_uri(mlflow_server["url"]):
        yield mlflow_server
        assert mlflow.active_run() is None, "a test left an MLflow run open"
    assert not list(tmp_path.glob("mlruns*")), "the client fell back to a local store"


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _rows(postgres: dict, sql: str) -> list[tuple]:
    import psycopg2

    dsn = {k: postgres[k] for k in ("host", "port", "user", "password")}
    with psycopg2.connect(dbname="mlflow", **dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def _mlflow_sqlite_stores(*roots: Path) -> list[Path]:
    """SQLite files under ``roots`` holding MLflow tables (other libraries' caches, e.g. onnxruntime's, aside)."""
    mlflow_tables = {"experiments", "runs", "registered_models", "model_versions", "users"}
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.stat().st_size < 16:
                continue
            with path.open("rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    continue
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables & mlflow_tables:
                found.append(path)
    return found


# -- tests ------------------------------------------------------------------------------------------------


def test_entrypoint_refuses_a_sqlite_backend(tmp_path):
    """Check that the server script rejects a non-PostgreSQL backend store before starting anything."""
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlruns.db",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a")}  # fmt: skip
    res = subprocess.run(["sh", ENTRYPOINT], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "must be a postgresql:// URI" in res.stderr
    assert not list(tmp_path.iterdir())


def test_entrypoint_names_a_missing_secret_file(tmp_path):
    """Check that a ``*_FILE`` variable pointing nowhere stops the script with the variable's name."""
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI_FILE": str(tmp_path / "absent"),
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a")}  # fmt: skip
    res = subprocess.run(["sh", ENTRYPOINT], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "MLFLOW_BACKEND_STORE_URI_FILE" in res.stderr


_REAL = "Zq3vN8pL2xR7tK4m"  # a password that is not a placeholder


@pytest.mark.parametrize(
    "env, match",
    [
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:replace-me@db:5432/mlflow"},
         "the password in MLFLOW_BACKEND_STORE_URI holds a placeholder"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:CHANGEME@db/mlflow"}, "holds a placeholder"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:s3cret@db/mlflow"}, "holds a password of 6 characters"),
        ({"MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:password@db/mlflow_auth", "MLFLOW_AUTH_ADMIN_PASSWORD": _REAL,
          "MLFLOW_FLASK_SERVER_SECRET_KEY": _REAL}, "the password in MLFLOW_AUTH_DATABASE_URI holds a placeholder"),
        ({"MLFLOW_AUTH_DATABASE_URI": f"postgresql://mlflow:{_REAL}@db/mlflow_auth", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin",
          "MLFLOW_FLASK_SERVER_SECRET_KEY": _REAL}, "MLFLOW_AUTH_ADMIN_PASSWORD holds a placeholder"),
        ({"MLFLOW_AUTH_DATABASE_URI": f"postgresql://mlflow:{_REAL}@db/mlflow_auth", "MLFLOW_AUTH_ADMIN_PASSWORD": _REAL,
          "MLFLOW_FLASK_SERVER_SECRET_KEY": "replace-me"}, "MLFLOW_FLASK_SERVER_SECRET_KEY holds a placeholder"),
    ],
    ids=["backend replace-me", "backend CHANGEME", "backend short", "auth db", "admin", "secret key"],
)  # fmt: skip
def test_entrypoint_refuses_placeholder_passwords(tmp_path, env, match):
    """Check ``.env.example``'s placeholders and short passwords stop the script, named but never echoed."""
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_BACKEND_STORE_URI": f"postgresql://mlflow:{_REAL}@db/mlflow",
            "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a"), **env}  # fmt: skip
    res = subprocess.run(["sh", ENTRYPOINT], env=full, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    assert match in res.stderr
    assert "replace-me" not in res.stderr and "CHANGEME" not in res.stderr and "s3cret" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_mlflow_server_keeps_secrets_off_the_command_line(mlflow_server, postgres):
    """Check no process shows the database or admin password in its command line (``ps`` shows them to
    every local user); the server's processes are found by their port."""
    import psutil

    port = mlflow_server["url"].rsplit(":", 1)[1]
    secrets_ = (postgres["password"], mlflow_server["admin_password"])
    server = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        assert not any(s in cmd for s in secrets_), f"pid {proc.info['pid']} shows a password: {cmd[:200]}"
        if port in cmd and "mlflow" in cmd:
            server.append(cmd)
    assert server, "found no mlflow server process to check"


def test_mlflow_server_requires_authentication(mlflow_server):
    """Check that basic-auth is on: anonymous and wrong-password calls get 401, the two users get 200."""
    api = mlflow_server["url"] + "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(mlflow_server["url"] + "/health") == 200
    assert _get(api) == 401
    assert _get(api, (ADMIN, "not-the-password")) == 401
    assert _get(api, (ADMIN, mlflow_server["admin_password"])) == 200
    assert _get(api, (SERVICE_USER, mlflow_server["service_password"])) == 200


def test_mlflow_server_tracks_registers_and_serves_the_champion(tracking, postgres, tmp_path):
    """Check nested runs, a registered ONNX model, the ``champion`` alias and loading it back, on PostgreSQL.

    Everything runs as the service user, not the admin: its default READ permission plus ownership of what
    it creates is enough for the pipeline.
    """
    import mlflow
    import onnx
    import torch
    from mlflow import MlflowClient

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).eval()
    x = torch.randn(7, 6)
    with torch.no_grad():
        expected = net(x).numpy()
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (x,), onnx_path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)  # fmt: skip

    mlflow.set_experiment("infra-postgres")
    with mlflow.start_run(run_name="grid") as parent:
        mlflow.log_params({"folds": 1, "seeds": 1})
        with mlflow.start_run(run_name="member-fold=0-seed=0", nested=True) as child:
            for epoch, loss in enumerate([0.9, 0.5, 0.3]):
                mlflow.log_metric("train_loss", loss, step=epoch)
            mlflow.log_metric("val_auc", 0.75)
            info = mlflow.onnx.log_model(
                onnx.load(onnx_path), name="model", registered_model_name=MODEL_NAME,
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=["onnx", "onnxruntime"], input_example=x.numpy(),
            )  # fmt: skip
        mlflow.log_metric("val_auc", 0.75)

    client = MlflowClient()
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert [r.info.run_id for r in children] == [child.info.run_id]
    assert [m.value for m in client.get_metric_history(child.info.run_id, "train_loss")] == [0.9, 0.5, 0.3]
    assert client.get_run(child.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

    client.set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == str(info.registered_model_version)
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = loaded.predict(x.numpy())
    got = out["y"] if isinstance(out, dict) else np.asarray(out)
    assert_allclose(np.asarray(got).reshape(-1), expected.reshape(-1), rtol=1e-5, atol=1e-6)

    # It all lives in PostgreSQL and the served artifact folder, and nowhere else.
    assert _rows(postgres, "SELECT count(*) FROM runs")[0][0] == 2
    assert _rows(postgres, "SELECT name FROM registered_models") == [(MODEL_NAME,)]
    assert _rows(postgres, "SELECT alias, version FROM registered_model_aliases") == [
        ("champion", int(info.registered_model_version))
    ]
    assert list(tracking["artifacts"].rglob("model.onnx")), "the model file is not in the artifact store"
    assert not _mlflow_sqlite_stores(tracking["work"], tmp_path), "an MLflow sqlite store was created"


def run_tiny_grid(tracking_uri: str, home: Path, workdir: Path, timeout: float = 600) -> tuple[int, str]:
    """Run the tiny grid job (``python -m jobs.train_grid``, ``platform/experiments/ci.yaml``) against a server.

    The client environment is what a Ray pod gets: ``MLFLOW_TRACKING_URI`` plus ``$HOME/.mlflow/credentials``.
    Returns the exit code and the combined output; on timeout the job's whole process group (its local
    Ray cluster included) is killed and the exit code is None.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(HOME=str(home), MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train_grid", "--config", str(REPO / "platform/experiments/ci.yaml"),
         "--no-progress"],
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_die_with_parent(signal.SIGTERM),
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        _stop(proc, signal.SIGTERM)
        out, _ = proc.communicate()
        return None, out
    finally:
        _stop(proc, signal.SIGTERM)  # Ray processes the job left behind share its process group


def test_tiny_grid_logs_to_the_postgres_backed_server(tracking, postgres, tmp_path):
    """Check that the tiny grid job tracks a parent run with nested member runs on the server."""
    from mlflow import MlflowClient

    rc, out = run_tiny_grid(tracking["url"], Path(os.environ["HOME"]), tmp_path)
    assert rc == 0, f"train_grid {'timed out' if rc is None else f'exited {rc}'}:\n{out[-6000:]}"
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], max_results=1000
    )
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    assert parents, f"no nested runs on the server; runs: {json.dumps([r.info.run_name for r in runs])}"
    assert not _mlflow_sqlite_stores(tracking["work"], tmp_path), "an MLflow sqlite store was created"
