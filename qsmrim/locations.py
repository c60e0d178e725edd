"""Where an experiment's results go: its run folder, its MLflow store and the store's artifacts.

A job submitted with ``ray job submit --working-dir .`` runs in Ray's copy of that folder
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/``), which Ray deletes; a relative
``runs_dir`` or the default ``mlruns.db`` would land there and be lost. :func:`locate_results` makes every
path absolute against a base folder the user names (``--base-dir``; default the current folder) and refuses
to start when a result would still land inside such a copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from qsmrim.config import ConfigError, ExperimentConfig
from qsmrim.console import add_lesion_source_args
from qsmrim.tracking.mlflow_runs import artifact_root, local_store_path, resolve_tracking_uri

__all__ = ["RAY_PACKAGE_DIR", "ResultLocations", "add_location_arguments", "config_from_args", "locate_results", "ray_package_copy"]

#: The part of a path that marks Ray's unpacked copy of a job's ``--working-dir``.
RAY_PACKAGE_DIR = ("runtime_resources", "working_dir_files")


@dataclass(frozen=True)
class ResultLocations:
    """Absolute places of one run's results."""

    run_dir: Path
    tracking_uri: str
    artifacts: Path | None

    def describe(self) -> str:
        """``run folder ...; MLflow store ... (artifacts ...)`` for the job's first and last lines."""
        extra = f" (artifacts {self.artifacts})" if self.artifacts is not None else ""
        return f"run folder {self.run_dir}; MLflow store {self.tracking_uri}{extra}"


def ray_package_copy(path: str | Path | None = None) -> Path | None:
    """The root of Ray's temporary working-dir copy that ``path`` (default: the current folder) lies in, or None."""
    parts = Path(path or os.getcwd()).resolve().parts
    n = len(RAY_PACKAGE_DIR)
    for i in range(len(parts) - n):
        if parts[i : i + n] == RAY_PACKAGE_DIR:
            return Path(*parts[: i + n + 1])
    return None


def locate_results(cfg: ExperimentConfig, *, run: str | Path | None = None, base: str | Path | None = None,
                   tracking_uri: str | None = None) -> tuple[ExperimentConfig, ResultLocations]:  # fmt: skip
    """``cfg`` with absolute ``runs_dir`` and ``data.root``, and where the run's results go.

    Relative paths (``runs_dir``, ``data.root``, ``grid.storage_path``, ``run``, a relative SQLite store) are taken
    against ``base`` (default: the current folder); the store is
    :func:`~qsmrim.tracking.mlflow_runs.resolve_tracking_uri`'s.
    Raises :class:`~qsmrim.config.ConfigError` when a result would be written inside Ray's temporary copy
    of a job's working folder, saying how to name a lasting place.
    """
    base_dir = Path(base or os.getcwd()).resolve()

    def _absolute(p: str | Path) -> Path:
        return Path(p) if Path(p).is_absolute() else base_dir / p

    data, grid = cfg.data, cfg.grid
    if data.root is not None:
        data = dataclasses.replace(data, root=str(_absolute(data.root)))
    if grid.storage_path is not None:  # Ray Train's checkpoints, when not under the run folder
        grid = dataclasses.replace(grid, storage_path=str(_absolute(grid.storage_path)))
    cfg = dataclasses.replace(cfg, runs_dir=str(_absolute(cfg.runs_dir)), data=data, grid=grid)
    run_dir = _absolute(run) if run is not None else Path(cfg.runs_dir) / cfg.name
    uri = resolve_tracking_uri(tracking_uri, base=base_dir)
    where = ResultLocations(run_dir=run_dir, tracking_uri=uri, artifacts=artifact_root(uri))
    copy = ray_package_copy(base_dir) or ray_package_copy()
    if copy is not None:
        places = (("run folder", run_dir), ("MLflow store", local_store_path(uri)), ("MLflow artifacts", where.artifacts),
                  ("grid.storage_path", grid.storage_path))  # fmt: skip
        doomed = [f"{what} {p}" for what, p in places if p is not None and ray_package_copy(p) == copy]
        if doomed:
            raise ConfigError(
                f"this job runs in Ray's temporary copy of its working folder ({copy}), which Ray deletes: "
                f"{', '.join(doomed)} would be lost. Name a lasting place: --base-dir /abs/path (runs/ and "
                "mlruns.db go there; for a cluster on this machine: --base-dir \"$PWD\" in the submitting shell), "
                "or an absolute runs_dir in the config (--set runs_dir=/abs/runs) with --tracking-uri "
                "(http://mlflow-server:5000 or sqlite:////abs/mlruns.db; or MLFLOW_TRACKING_URI)"
            )  # fmt: skip
    return cfg, where


def add_location_arguments(parser: argparse.ArgumentParser, *, base_dir: bool = True) -> None:
    """``--data``, ``--lesions-from``/``--lesions-desc``, ``--tracking-uri`` (and ``--base-dir``) for every command that
    trains from a config."""
    parser.add_argument("--data", metavar="ROOT", help="your cohort: a BIDS root or CSV manifest (sets data.root)")
    add_lesion_source_args(parser, config=True)
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<base folder>/mlruns.db)")  # fmt: skip
    if base_dir:
        parser.add_argument("--base-dir", metavar="DIR", help="folder for relative paths: runs_dir, --data, the default "
                            "mlruns.db (default: the current folder; a Ray job needs an absolute one, e.g. \"$PWD\")")  # fmt: skip


def config_from_args(args: argparse.Namespace, *, run: str | Path | None = None) -> tuple[ExperimentConfig, ResultLocations]:
    """Load ``args.config`` with ``--set`` overrides and ``--data``, then :func:`locate_results` it."""
    from qsmrim.config import load_config, parse_overrides

    overrides = parse_overrides(getattr(args, "set", None))
    if getattr(args, "data", None):
        overrides["data.root"] = str(args.data)
    for option in ("lesions_from", "lesions_desc"):
        if getattr(args, option, None):
            overrides[f"data.{option}"] = str(getattr(args, option))
    cfg = load_config(args.config, overrides)
    return locate_results(cfg, run=run, base=getattr(args, "base_dir", None),
                          tracking_uri=getattr(args, "tracking_uri", None))  # fmt: skip
