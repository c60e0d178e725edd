"""The main job, end to end (DESIGN §1), as far as the project implements it.

Stages write into one run folder and are skipped when their outputs are already there with the same
inputs, so a crashed demo resumes where it stopped. The data stage is :mod:`qsmrim.prepare` (re-exported
here for callers of ``qsmrim.pipeline.prepare_cohort`` / ``synthesize_once``).
"""

from __future__ import annotations

from pathlib import Path

from qsmrim.config import ExperimentConfig
from qsmrim.prepare import PipelineResult, prepare_cohort, synthesize_once

__all__ = ["PipelineResult", "prepare_cohort", "run_pipeline", "synthesize_once"]


def run_pipeline(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, scheduler: str | None = None,
                 register: bool = True, progress: bool = True, tracking_uri: str | None = None) -> dict:  # fmt: skip
    """Every stage of DESIGN §1 up to a registered model; returns a summary (paths, MLflow ids, metrics).

    cohort -> lesion table + patches -> radiomics -> fold x seed grid (Ray, MLflow) -> evaluation ->
    one ONNX ensemble of ``cfg.models[0]``, registered as ``qsmrim`` (alias ``champion`` when its CV PR AUC
    is at least the current champion's). Each stage runs once and is resumable. ``tracking_uri``: the MLflow store
    of the grid and the registry (:func:`qsmrim.tracking.mlflow_runs.resolve_tracking_uri` decides the default).
    """
    from qsmrim.experiment import prepare_run, run_dir_of
    from qsmrim.export.run import export_run
    from qsmrim.grid.ray_grid import finish_grid, train_grid
    from qsmrim.training.layout import RunLayout

    run = prepare_run(cfg, run_dir_of(cfg, run_dir).resolve(), scheduler=scheduler)
    grid = train_grid(cfg, run, progress=progress, tracking_uri=tracking_uri)
    if grid["errors"]:
        return {"run_dir": str(run), "grid": dict(grid)}
    finish_grid(grid)
    summary: dict = {"run_dir": str(run), "grid": dict(grid)}
    exported = export_run(run, RunLayout(run).export_onnx, register=register, model=cfg.models[0],
                          tracking_uri=grid["tracking_uri"])  # fmt: skip
    summary["export"] = {k: v for k, v in exported.items() if k != "sidecar_content"}
    return summary
