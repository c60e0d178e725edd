"""MLflow runs of a grid: one parent run per grid, one child run per (model, fold, seed) trial.

Only the client API is used (no global active run), so the grid driver, Ray workers and resumed grids can
all write to the same runs. Runs are found again by tags (``qsmrim.run_dir``, ``qsmrim.member``), never
by time stamps, which is what makes ``--resume`` reuse them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from qsmrim.provenance import git_commit

__all__ = [
    "ARTIFACTS_DIR",
    "STORE_FILE",
    "TRACKING_ENV",
    "artifact_root",
    "default_tracking_uri",
    "local_store_path",
    "resolve_tracking_uri",
    "git_commit",
    "package_versions",
    "ensure_experiment",
    "start_parent_run",
    "start_child_runs",
    "log_epoch",
    "finish_run",
    "find_grid_run",
    "cv_metrics",
    "log_results",
    "flatten",
]

log = logging.getLogger(__name__)

TAG_RUN_DIR = "qsmrim.run_dir"
TAG_MEMBER = "qsmrim.member"
TAG_KIND = "qsmrim.kind"
_PACKAGES = ("qsmrim", "torch", "ray", "mlflow", "dask", "numpy", "onnxruntime-gpu", "pyradiomics-bhklab", "scikit-learn")


#: The one environment variable that names a store for every command (MLflow's own).
TRACKING_ENV = "MLFLOW_TRACKING_URI"
#: The local default store and its artifact folder, beside each other in the folder the command runs from.
STORE_FILE = "mlruns.db"
ARTIFACTS_DIR = "mlartifacts"


def default_tracking_uri(base: str | Path | None = None) -> str:
    """The local default store: ``sqlite:///<base>/mlruns.db`` (``base``: the current folder), absolute."""
    return f"sqlite:///{Path(base or '.').resolve() / STORE_FILE}"


def resolve_tracking_uri(explicit: str | None = None, *, base: str | Path | None = None) -> str:
    """The MLflow store of every command (grid, export, predict, serve, demo, the jobs): ``explicit`` (a
    ``--tracking-uri`` flag), else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri` of ``base``.

    One function, because MLflow's own fallback (``./mlflow.db``) differs from ours: a server that fell back
    to it could not find the model the grid had registered. A relative SQLite path is made absolute here, so
    Ray workers and Serve replicas (whose working folder differs) open the same file.
    """
    uri = explicit or os.environ.get(TRACKING_ENV) or default_tracking_uri(base)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{(Path(base or '.') / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local store keeps its runs in (``sqlite:///`` file or ``file://`` folder); None for
    a tracking server (``http(s)://``, ``databricks`` ...), which keeps them wherever it runs."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            return Path(uri.removeprefix(scheme))
    return None


def artifact_root(uri: str) -> Path | None:
    """Where a local SQLite store's artifacts go: ``mlartifacts/`` beside the database file, so a store and
    its files move together; None when the store (a server, a file store) decides itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return db.parent / ARTIFACTS_DIR


def package_versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"training.epochs": "40", ...}`` (MLflow params are strings, <= 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return {k: v[:6000] for k, v in out.items()}


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str):
    """One client per store and process: a new client of a SQLite store checks the schema (about a second), which
    every epoch of every member paid when each call built its own (24 of a demo member's 50 s)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path | None = None) -> str:
    """Experiment id of ``name``, created if missing (local stores put artifacts under ``artifact_root``)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and tracking_uri.startswith("sqlite:"):
        location = Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _find_run(client, experiment_id: str | list[str], filters: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    ids = [experiment_id] if isinstance(experiment_id, str) else experiment_id
    runs = client.search_runs(ids, filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def find_grid_run(tracking_uri: str, run_dir: str | Path) -> str | None:
    """The newest grid parent run of ``run_dir`` in the store, in any experiment; None when there is none (a local
    store that does not exist yet is not created by asking)."""
    store = local_store_path(tracking_uri)
    if store is not None and not store.exists():
        return None
    client = _client(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    return _find_run(client, ids, {TAG_RUN_DIR: str(Path(run_dir).resolve()), TAG_KIND: "grid"})


def cv_metrics(evaluation: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """MLflow metrics of an evaluation by method label: ``cv_<model>[_honest]_{pr_auc,proc_auc,f1,subject_r}``,
    missing values left out."""
    metrics: dict[str, Any] = {}
    for label, r in evaluation.items():
        key = label.replace(" [honest]", "_honest").replace("-", "_")
        metrics.update({f"cv_{key}_pr_auc": r["pr"]["auc"], f"cv_{key}_proc_auc": r["proc"]["auc"],
                        f"cv_{key}_f1": r["lesion"]["f1"], f"cv_{key}_subject_r": r["subject"]["r"]})  # fmt: skip
    return {k: v for k, v in metrics.items() if v is not None}


def start_parent_run(tracking_uri: str, experiment_id: str, run_dir: str | Path, *, name: str,
                     params: Mapping[str, Any], tags: Mapping[str, str], artifacts: list[Path]) -> str:  # fmt: skip
    """The grid's parent run (reused when the same run folder is resumed); returns its id."""
    client = _client(tracking_uri)
    run_dir = str(Path(run_dir).resolve())
    run_id = _find_run(client, experiment_id, {TAG_RUN_DIR: run_dir, TAG_KIND: "grid"})
    if run_id is None:
        run = client.create_run(experiment_id, run_name=name, tags={TAG_RUN_DIR: run_dir, TAG_KIND: "grid", **tags})
        run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    else:
        client.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
        log.info("resuming MLflow parent run %s", run_id)
    for a in artifacts:
        if Path(a).exists():
            client.log_artifact(run_id, str(a))
    return run_id


def start_child_runs(tracking_uri: str, parent_run_id: str, members: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """One child run per member name under ``parent_run_id`` (existing ones reused and set running again);
    returns ``{member: run id}``. One search finds a stacked trial's existing runs, not one per member."""
    from mlflow.entities import Param

    client = _client(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    existing: dict[str, str] = {}
    token = None
    while True:  # newest first, so a member's latest run wins
        page = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000, order_by=["attributes.start_time DESC"], page_token=token)  # fmt: skip
        for run in page:
            existing.setdefault(run.data.tags.get(TAG_MEMBER, ""), run.info.run_id)
        token = page.token
        if not token:
            break
    out = {}
    for member, params in members.items():
        run_id = existing.get(member)
        if run_id is None:
            run = client.create_run(exp, run_name=member, tags={"mlflow.parentRunId": parent_run_id, TAG_MEMBER: member,
                                                               TAG_KIND: "member"})  # fmt: skip
            run_id = run.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(params).items()][:100])
        else:
            client.update_run(run_id, status="RUNNING")
        out[member] = run_id
    return out


def log_epoch(tracking_uri: str, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
    """Per-epoch numbers with ``step=epoch``, names prefixed ``train_`` unless they already carry a split."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        if k == "epoch" or not isinstance(v, int | float):
            continue
        name = k if k.startswith(("train_", "val_", "test_")) else f"train_{k}"
        items.append(Metric(name, float(v), ts, epoch))
    if items:
        _client(tracking_uri).log_batch(run_id, metrics=items)


def finish_run(tracking_uri: str, run_id: str, *, metrics: Mapping[str, Any] | None = None,
               artifacts_dir: str | Path | None = None, status: str = "FINISHED") -> None:  # fmt: skip
    """Log final metrics and a folder of artifacts, then close the run with ``status``."""
    log_results(tracking_uri, run_id, metrics=metrics, artifacts_dir=artifacts_dir)
    _client(tracking_uri).set_terminated(run_id, status=status)


def log_results(tracking_uri: str, run_id: str, *, metrics: Mapping[str, Any] | None = None,
                artifacts_dir: str | Path | None = None) -> None:  # fmt: skip
    """Log finite numeric metrics (step 0) and a folder of artifacts to a run, leaving its status as it is."""
    import math
    import time

    from mlflow.entities import Metric

    client = _client(tracking_uri)
    if metrics:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))]  # fmt: skip
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i : i + 500])
    if artifacts_dir is not None and Path(artifacts_dir).exists():
        client.log_artifacts(run_id, str(artifacts_dir))
