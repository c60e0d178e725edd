"""Typed, frozen values that cross the Ray boundary of the grid, instead of dicts of strings.

Ray's habit (``doc/source/train/doc_code/train_tune_interop.py``): the Tune trainable gets the grid's values
and builds a ``TorchTrainer`` whose ``train_loop_config`` the worker unpacks at its top. Here each level gets
one frozen dataclass: :class:`GridTrial` is a Tune grid value, :class:`GridPlan` is what every trial of one
grid shares (``tune.with_parameters``), :class:`TrialWork` is what one trial's Train worker needs
(``train_loop_config["work"]``). Ray pickles them; nothing is parsed back from strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qsmrim.training import TrainConfig

__all__ = ["GridPlan", "GridTrial", "TrialWork"]


@dataclass(frozen=True)
class GridTrial:
    """One Tune trial: ``model``'s (fold, seed) members that train in one process; ``stacked`` when the model
    stacks them (:func:`qsmrim.experiment.member_groups`)."""

    model: str
    members: tuple[tuple[int, int], ...]
    stacked: bool


@dataclass(frozen=True)
class GridPlan:
    """What every trial of one grid shares: the run, each model's training config, Ray and MLflow settings."""

    run_dir: Path
    splits_path: Path
    train_configs: Mapping[str, TrainConfig]
    storage_path: str
    max_failures: int
    cpus_per_trial: float
    worker_start_timeout_s: float
    use_gpu: bool
    gpu_per_trial: float
    tracking_uri: str | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True)
class TrialWork:
    """What one trial's Train worker fits: the unfinished ``members`` of ``model`` into ``member_dirs``, resuming
    from ``checkpoint_dir``, on ``threads`` torch threads."""

    train_config: TrainConfig
    model: str
    members: tuple[tuple[int, int], ...]
    stacked: bool
    member_dirs: tuple[Path, ...]
    checkpoint_dir: Path
    splits_path: Path
    threads: int
    tracking_uri: str | None = None
    parent_run_id: str | None = None
