"""Typed, frozen experiment configuration loaded once from YAML (``platform/experiments/*.yaml``).

Each section is a frozen dataclass; unknown keys and wrong types fail at load time with the dotted name of
the field, so a typo in a config never silently falls back to a default. CLI overrides address nested keys
(``--set data.subjects=8``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qsmrim.data.bids import LesionSource
from qsmrim.training.config import TrainConfig

__all__ = ["ConfigError", "DataConfig", "GridConfig", "ExperimentConfig", "load_config", "config_to_dict", "no_cohort_message",
           "parse_overrides", "section_from_dict"]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class DataConfig:
    """Where the cohort comes from: a BIDS root / CSV manifest (``root``), or, only when ``synthesize`` says so,
    the embedded synthetic cohort of ``synth_subjects`` subjects (each as ``synth_sessions`` sessions when set).
    A BIDS root's lesion maps are read from ``lesions_from`` with ``desc-<lesions_desc>`` (docs/data.md). Neither is refused at load time
    (:func:`load_config`): a config that forgot its data must not quietly train on synthetic subjects."""

    root: str | None = None
    synthesize: bool = False
    synth_subjects: int = 12
    synth_seed: int = 0
    synth_shape: tuple[int, int, int] = (160, 160, 40)
    synth_difficulty: float = 0.5
    synth_sessions: int | None = None
    patch_size: tuple[int, int, int] = (16, 32, 32)
    lesions_from: str = "derivatives/lesions"
    lesions_desc: str = "lesions"

    def lesion_source(self) -> LesionSource:
        """Where a BIDS root's lesion maps are: ``lesions_from`` (relative to ``root`` or absolute), ``desc-``."""
        return LesionSource(self.lesions_from, self.lesions_desc)


@dataclass(frozen=True)
class GridConfig:
    """How the fold x seed (x model) grid is scheduled on Ray.

    ``stack_seeds``: a trial trains every seed of one fold as one stacked network (QSMRim-Net family,
    :func:`qsmrim.training.fit_stack.fit_members`), so the paper grid is 5 trials, not 15; other models, or
    ``false``, get one trial per seed. ``stack_folds`` (with ``stack_seeds``) makes one trial per model that
    stacks all its folds and seeds in one process (:func:`qsmrim.training.fit_stack.fit_stack`): one GPU is
    then not time-sliced between trials, but a cluster's other GPUs stay idle. ``trials_per_model`` (with
    ``stack_seeds``) splits each model's members into that many trials of nearly equal size instead: on a small
    CPU machine, as many trials as cores keeps every core busy to the end (5 fold trials on 2 cores run in
    rounds of 2, 2 and 1) and pays Ray Train's start-up only that many times.
    ``trials_per_gpu`` trials share one GPU (fractional GPUs); on a
    CPU-only cluster each trial takes ``cpus_per_trial`` CPUs.
    ``address`` is passed to ``ray.init`` (``None``: connect to ``RAY_ADDRESS`` or start a local Ray).
    ``max_failures`` restarts a trial's Train worker group after a crash (it resumes from its checkpoint);
    ``trial_max_failures`` retries the whole trial at the Tune level on top of that (each level multiplies
    the attempts a deterministic error costs, hence 0 by default).
    """

    stack_seeds: bool = True
    stack_folds: bool = False
    trials_per_model: int | None = None
    trials_per_gpu: int = 5
    cpus_per_trial: float = 1.0
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    trial_max_failures: int = 0
    worker_start_timeout_s: float = 600.0
    storage_path: str | None = None
    address: str | None = None
    mlflow_experiment: str | None = None

    def __post_init__(self) -> None:
        if self.trials_per_model is not None and self.trials_per_model < 1:
            raise ValueError(f"trials_per_model must be >= 1 (or null), not {self.trials_per_model}")
        if self.trials_per_gpu < 1:
            raise ValueError(f"trials_per_gpu must be >= 1, not {self.trials_per_gpu}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"cpus_per_trial must be > 0, not {self.cpus_per_trial}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, not {self.max_failures}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``models`` are registry names trained on the same folds and seeds (the first is
    the one exported and served); ``training`` applies to each (``training.model`` is replaced per model).
    Sections not yet consumed by code are kept as plain mappings in ``extra``."""

    name: str = "experiment"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    models: tuple[str, ...] = ("qsmrimnet",)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


_SECTIONS: dict[str, type] = {"data": DataConfig, "training": TrainConfig, "grid": GridConfig}
_TOP_LEVEL: dict[str, Any] = {"name": str, "runs_dir": str, "models": tuple[str, ...], "model_overrides": dict[str, Any]}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        inner = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, inner, strict=True)))
    if tp is Any:
        return value
    if tp is float and isinstance(value, str) and isinstance(_scalar(value), float):
        return _scalar(value)  # `lr: 1e-3` in a YAML file (a string to YAML 1.1)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def section_from_dict(cls: type, raw: dict[str, Any] | None, where: str = "") -> Any:
    """One typed config section (e.g. :class:`~qsmrim.training.TrainConfig`) from a plain mapping, checked as
    :func:`load_config` checks a file's (unknown keys and wrong types fail naming ``where.<key>``)."""
    return _build(cls, raw, where)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Parse a YAML experiment config (plus dotted overrides) into an :class:`ExperimentConfig`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    top = {k: v for k, v in raw.items() if k in _TOP_LEVEL}
    sections = {k: v for k, v in raw.items() if k in _SECTIONS}
    extra = {k: v for k, v in raw.items() if k not in top and k not in sections}
    try:
        built = {k: _build(_SECTIONS[k], v, k) for k, v in sections.items()}
        cfg = ExperimentConfig(**{k: _coerce(v, _TOP_LEVEL[k], k) for k, v in top.items()}, **built, extra=extra)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if cfg.data.root is None and not cfg.data.synthesize:
        raise ConfigError(f"{path}: {no_cohort_message(cfg.data)}")
    return cfg


def no_cohort_message(data: DataConfig) -> str:
    """What to do when a config names no cohort (``data.root`` null, ``data.synthesize`` not true)."""
    return ("no cohort: data.root is null and data.synthesize is not true. Train on your own data with "
            "--data ROOT (a BIDS root or a CSV manifest) or `data: {root: ROOT}` in the config; or, for the "
            f"synthetic cohort of data.synth_subjects={data.synth_subjects} subjects, set `data.synthesize: true` "
            "(or --set data.synthesize=true)")  # fmt: skip


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["data.subjects=8", ...]`` -> ``{"data.subjects": 8}`` with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        out[key.strip()] = _scalar(yaml.safe_load(value))
    return out


def _scalar(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a number is meant."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity") else value
        except ValueError:
            return value
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (tuples become lists)."""
    d = dataclasses.asdict(cfg)

    def _plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [_plain(x) for x in v]
        if isinstance(v, dict):
            return {k: _plain(x) for k, x in v.items()}
        return v

    return _plain(d)
