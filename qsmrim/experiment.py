"""Run an experiment config on one machine without Ray: prepare, extract features, fit every member, evaluate.

This is the reference (sequential) backend: the Ray grid runs the same :func:`member_config` /
:func:`qsmrim.training.fit_member` per trial and writes the same run layout, so evaluation and export
do not care which backend trained a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from qsmrim.config import ExperimentConfig, config_to_dict
from qsmrim.models import is_torch_model
from qsmrim.training import LesionDataset, Member, TrainConfig, fit_member, load_or_make_splits
from qsmrim.training.fit import EpochCallback
from qsmrim.training.fit_stack import fit_stack, stacking_pays
from qsmrim.training.layout import RunLayout

__all__ = ["run_dir_of", "member_config", "member_groups", "needs_radiomics", "prepare_run", "train_local", "load_run_data"]

log = logging.getLogger(__name__)


def run_dir_of(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Path:
    """``<runs_dir>/<name>`` unless given."""
    return Path(run_dir) if run_dir is not None else Path(cfg.runs_dir) / cfg.name


def member_config(cfg: ExperimentConfig, model: str) -> TrainConfig:
    """The training config of one model: ``training`` with ``model`` set and its overrides applied."""
    kwargs = dict(cfg.training.model_kwargs) if is_torch_model(model) else {}  # torch sizing means nothing to the RF
    kwargs.update(cfg.model_overrides.get(model, {}))
    return dataclasses.replace(cfg.training, model=model, model_kwargs=kwargs)


def needs_radiomics(models: tuple[str, ...] | list[str]) -> bool:
    """Whether any of the models reads radiomic features."""
    from qsmrim.models import uses_radiomics

    return any(uses_radiomics(name) for name in models)


def features_path(run_dir: Path) -> Path:
    """:attr:`~qsmrim.training.layout.RunLayout.features`."""
    return RunLayout(run_dir).features


def prepare_run(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, scheduler: str | None = None) -> Path:
    """Cohort, lesion table, patches, features (when a model needs them) and splits into the run folder."""
    from qsmrim.prepare import prepare_cohort

    run = run_dir_of(cfg, run_dir)
    layout = RunLayout(run)
    prep = prepare_cohort(cfg, layout.prepared)
    if needs_radiomics(cfg.models):
        from qsmrim.fanout.features import extract_cohort

        extract_cohort(prep.outputs["cohort"], layout.features.parent, scheduler=scheduler,
                       lesions=cfg.data.lesion_source())  # fmt: skip
    data = load_run_data(run, with_features=needs_radiomics(cfg.models))
    load_or_make_splits(layout.splits, data.rim_counts(), cfg.training.n_folds, cfg.training.split_seed)
    layout.config.write_text(json.dumps(config_to_dict(cfg), indent=2))
    return run


def load_run_data(run_dir: str | Path, *, with_features: bool) -> LesionDataset:
    """The run's :class:`LesionDataset` (patches memory-mapped)."""
    layout = RunLayout(Path(run_dir))
    return LesionDataset.from_run_dir(layout.prepared, layout.features if with_features else None)


def member_groups(cfg: ExperimentConfig, model: str, n_folds: int) -> tuple[bool, list[list[tuple[int, int]]]]:
    """Whether ``model``'s members train stacked, and its (fold, seed) members grouped as they train: one group
    per fold (``grid.stack_seeds``), one for the model (``grid.stack_folds`` too), ``grid.trials_per_model``
    groups of nearly equal size (consecutive in fold, seed order), else one per member. The grid makes a trial of
    each group; ``train_local`` fits each group in turn."""
    from qsmrim.models import is_stackable

    seeds = list(member_config(cfg, model).seeds)
    stacked = cfg.grid.stack_seeds and is_stackable(model)
    if stacked and cfg.grid.stack_folds:
        return True, [[(f, s) for f in range(n_folds) for s in seeds]]
    if stacked and cfg.grid.trials_per_model:
        everyone = [(f, s) for f in range(n_folds) for s in seeds]
        k = min(cfg.grid.trials_per_model, len(everyone))
        bounds = [round(i * len(everyone) / k) for i in range(k + 1)]
        return True, [everyone[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    if stacked:
        return True, [[(f, s) for s in seeds] for f in range(n_folds)]
    return False, [[(f, s)] for f in range(n_folds) for s in seeds]


def train_local(cfg: ExperimentConfig, run_dir: str | Path | None = None, *,
                on_epoch: EpochCallback | None = None) -> list[Member]:  # fmt: skip
    """Fit every (model, fold, seed) member without Ray, skipping finished ones (resume); with
    ``grid.stack_seeds`` the unfinished seeds of a fold train stacked (QSMRim-Net family), with
    ``grid.stack_folds`` too all of a model's unfinished members in one stack; on a CPU, where stacking is
    slower (:func:`~qsmrim.training.fit_stack.stacking_pays`), one after another."""
    import json as _json

    run = run_dir_of(cfg, run_dir)
    layout = RunLayout(run)
    data = load_run_data(run, with_features=needs_radiomics(cfg.models))
    splits = _json.loads(layout.splits.read_text())
    members = []
    for model in cfg.models:
        mcfg = member_config(cfg, model)
        stacked, groups = member_groups(cfg, model, len(splits))
        for group in groups:
            todo = []
            for fold, seed in group:
                if layout.member_done(model, fold, seed):
                    members.append(Member.load(layout.member(model, fold, seed)))
                else:
                    todo.append((fold, seed))
            if stacked and todo and stacking_pays(mcfg):
                log.info("fitting %s members %s (stacked)", model, todo)
                outs = [layout.member(model, f, s) for f, s in todo]
                each = (lambda e, rows: [on_epoch(e, r) for r in rows.values()]) if on_epoch else None
                members += fit_stack(mcfg, data, splits, todo, out_dirs=outs, checkpoint_dir=layout.stack(model, todo),
                                     on_epoch=each)  # fmt: skip
                continue
            for fold, seed in todo:
                log.info("fitting %s fold %d seed %d", model, fold, seed)
                members.append(fit_member(mcfg, data, splits, fold, seed, out_dir=layout.member(model, fold, seed),
                                          on_epoch=on_epoch))  # fmt: skip
    return members
