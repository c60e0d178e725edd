"""Ray Tune grid over (model, fold[, seed]); each trial fits its member(s) inside a Ray Train ``TorchTrainer``.

With ``grid.stack_seeds`` (default) a trial is one fold of one model and trains all its seeds as one
stacked network (:func:`qsmrim.training.fit_stack.fit_stack`); with ``grid.stack_folds`` too, one trial
per model stacks all its folds and seeds; otherwise, and for models that cannot be stacked, a trial is one
(model, fold, seed) member.

Two functions at two levels (Ray Train V2 + Tune): :func:`train_fn_per_worker` is the training loop (it
calls :func:`qsmrim.training.fit_member`), :func:`train_driver_fn` is the Tune function trainable that
builds and fits a ``TorchTrainer`` and passes reports up with ``TuneReportCallback``.

The cohort arrays go into the object store once (``ray.put``) and every trial reads them by reference.
A trial whose member folder is complete returns at once, and an unfinished one resumes from its last
checkpoint, so ``qsmrim grid --resume RUN`` (or re-running the same config) never redoes finished work.

Stages: :func:`train_grid` trains a prepared run and :func:`finish_grid` evaluates it and closes the MLflow
parent run; :func:`run_grid` (``qsmrim grid``) prepares, trains and evaluates, and
:func:`qsmrim.pipeline.run_pipeline` calls the same stages, each once, before the export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qsmrim.config import ExperimentConfig, config_to_dict
from qsmrim.experiment import (
    load_run_data,
    member_config,
    member_groups,
    needs_radiomics,
    prepare_run,
    run_dir_of,
)
from qsmrim.grid.specs import GridPlan, GridTrial, TrialWork
from qsmrim.models import is_torch_model
from qsmrim.training.layout import RunLayout, member_name

__all__ = ["GridResult", "run_grid", "train_grid", "finish_grid", "grid_trials", "trial_name", "train_fn_per_worker", "train_driver_fn", "grid_resources"]

log = logging.getLogger(__name__)

#: Seconds between a trial's progress reports to Ray when no checkpoint is due. Ray Train's report blocks until the
#: controller has taken the previous one (a queue of one, polled about once a second): reporting every epoch of a
#: small model cost 24 of a demo member's 50 s.
REPORT_INTERVAL_S = 10.0
DRIVER_CPUS = 0.01
"""CPUs a trial's Tune driver function reserves (0 is refused by Tune)."""


class GridResult(dict):
    """Summary of a grid: run folder, MLflow parent run id, trials, wall time, evaluation results."""


def trial_name(model: str, members: Sequence[Sequence[int]]) -> str:
    """Stable trial name: a member's name for one (fold, seed), ``<model>-fold=<k>-seeds=0,1,2`` for a fold's
    stack, ``<model>-folds=0,1-seeds=0,1,2`` for a stack across folds."""
    folds = sorted({int(f) for f, _ in members})
    seeds = sorted({int(s) for _, s in members})
    if len(members) == 1:
        return member_name(model, folds[0], seeds[0])
    if len(folds) == 1:
        return f"{model}-fold={folds[0]}-seeds={','.join(map(str, seeds))}"
    return f"{model}-folds={','.join(map(str, folds))}-seeds={','.join(map(str, seeds))}"


def grid_trials(cfg: ExperimentConfig, n_folds: int) -> list[GridTrial]:
    """The grid's trials: one per member, per fold (``grid.stack_seeds``) or per model (``grid.stack_folds``
    too), stacking only stackable models (:func:`qsmrim.experiment.member_groups`)."""
    trials = []
    for model in cfg.models:
        stacked, groups = member_groups(cfg, model, n_folds)
        trials += [GridTrial(model, tuple((int(f), int(s)) for f, s in g), stacked) for g in groups]
    return trials


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _checkpoint_file(work: TrialWork) -> str:
    from qsmrim.training.fit import CHECKPOINT_NAME
    from qsmrim.training.fit_stack import stack_checkpoint_name

    return stack_checkpoint_name(list(work.members)) if work.stacked else CHECKPOINT_NAME


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: fit a trial's member(s), report every epoch (with a checkpoint) to Train/Tune/MLflow.

    ``config`` is ``{"work": TrialWork, "data_ref": [ObjectRef]}``, unpacked here and nowhere else. A stacked
    trial fits its members together (``fit_stack``); each member still has its own MLflow child run with its
    own epoch metrics.
    """
    import ray
    import ray.train
    import torch

    work: TrialWork = config["work"]
    cfg, model, members = work.train_config, work.model, list(work.members)
    outs, ckpt_dir, ckpt_file = list(work.member_dirs), work.checkpoint_dir, _checkpoint_file(work)
    uri, parent = work.tracking_uri, work.parent_run_id
    # Ray pins a worker's OMP threads to its CPU share, which the driver's sliver makes fractional (1.99 -> 1):
    # a CPU trial's torch uses the cpus_per_trial it was given.
    torch.set_num_threads(work.threads)
    from qsmrim.training import LesionDataset, fit_member
    from qsmrim.training.fit_stack import fit_stack, stacking_pays

    data = LesionDataset(**ray.get(config["data_ref"][0]))
    splits = json.loads(work.splits_path.read_text())
    rank0 = ray.train.get_context().get_world_rank() == 0
    # Hand-off folders of this trial's checkpoint reports (see on_epoch_stack); one left by a killed worker of
    # this trial is stale (nothing of this trial runs but this worker), those of other trials are not touched.
    report_prefix = f".report-{trial_name(model, members)}-"
    if rank0 and ckpt_dir.parent.exists():
        for stale in ckpt_dir.parent.glob(report_prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    # Ray's last stored checkpoint only stands in for a missing local one (another node): a worker killed just
    # after writing epoch E may not have had E's report stored yet (uploads run in the background), and the
    # local file, replaced whole on every write, is never older than what was reported from it.
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None and rank0 and not (ckpt_dir / ckpt_file).exists():
        with ckpt.as_directory() as d:
            src = Path(d) / ckpt_file
            if src.exists():
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, ckpt_dir / ckpt_file)
    children: dict[tuple[int, int], str] = {}
    if uri and parent and rank0:
        from qsmrim.tracking.mlflow_runs import start_child_runs

        runs = start_child_runs(uri, parent, {member_name(model, fold, seed): {
            "model": model, "fold": fold, "seed": seed, "stack_size": len(members), **config_to_dict(cfg)}
            for fold, seed in members})  # fmt: skip
        children = {(fold, seed): runs[member_name(model, fold, seed)] for fold, seed in members}
    first_fold, first_seed = members[0]

    last_report = [float("-inf")]

    def on_epoch_stack(epoch: int, rows: dict[tuple[int, int], dict[str, Any]],
                       trial_epoch: int | None = None, trial_epochs: int | None = None) -> None:  # fmt: skip
        from qsmrim.tracking.mlflow_runs import log_epoch

        for (fold, seed), row in rows.items():
            if (fold, seed) in children:
                log_epoch(uri, children[(fold, seed)], epoch, {**{k: v for k, v in row.items() if k != "checkpoint"},
                                                               "fold": fold, "seed": seed, "done": 0})  # fmt: skip
        first = next(iter(rows.values()))
        metrics = {"epoch": trial_epoch or epoch, "epochs": trial_epochs or first.get("epochs", cfg.epochs),
                   "fold": first_fold, "seed": first_seed,
                   "train_loss": sum(r["train_loss"] for r in rows.values()) / len(rows), "done": 0}  # fmt: skip
        if not (rank0 and first.get("checkpoint")) and time.monotonic() - last_report[0] < REPORT_INTERVAL_S:
            return  # MLflow has the epoch; Ray hears of progress every REPORT_INTERVAL_S (and of every checkpoint)
        last_report[0] = time.monotonic()
        if rank0 and first.get("checkpoint"):
            src = Path(first["checkpoint"])
            # Near the checkpoint (same filesystem), outside member folders: a hard link, not a second copy of a
            # GB-sized file. Ray Train copies it into the run's storage in the background while training goes
            # on, then deletes the link; fit_* replaces the checkpoint file by a rename, never rewrites it.
            tmp = Path(tempfile.mkdtemp(dir=src.parent.parent, prefix=report_prefix))
            _link_or_copy(src, tmp / ckpt_file)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True)  # fmt: skip
        else:
            ray.train.report(metrics)

    stacked = work.stacked and stacking_pays(cfg)  # on a CPU a stacked trial fits its members in turn

    def fit() -> list:
        if stacked:
            return fit_stack(cfg, data, splits, members, out_dirs=outs if rank0 else None,
                             checkpoint_dir=ckpt_dir if rank0 else None, on_epoch=on_epoch_stack)  # fmt: skip
        if len(members) == 1:
            ((fold, seed),) = members
            return [fit_member(cfg, data, splits, fold, seed, out_dir=outs[0] if rank0 else None,
                               on_epoch=lambda e, row: on_epoch_stack(e, {(fold, seed): row}))]  # fmt: skip
        # A stacked trial on a CPU: its members one after another (stacking is slower there). Each resumes from its
        # own checkpoint in its member folder; the trial reports its progress over all of them.
        fitted = []
        for i, (fold, seed) in enumerate(members):
            def each(e: int, row: dict[str, Any], i: int = i, key: tuple[int, int] = (fold, seed)) -> None:
                per = int(row.get("epochs", cfg.epochs))
                on_epoch_stack(e, {key: {**row, "checkpoint": ""}}, trial_epoch=i * per + e, trial_epochs=per * len(members))

            fitted.append(fit_member(cfg, data, splits, fold, seed, out_dir=outs[i] if rank0 else None, on_epoch=each))
        return fitted

    from qsmrim.tracking.mlflow_runs import finish_run

    try:
        fitted = fit()
    except BaseException:
        for child in children.values():
            finish_run(uri, child, status="FAILED")
        raise
    final: dict[str, Any] = {}
    for member, out in zip(fitted, outs, strict=True):
        metrics = {k: v for k, v in member.metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}
        if (member.fold, member.seed) in children:
            finish_run(uri, children[(member.fold, member.seed)], metrics=metrics, artifacts_dir=out)
        final.update(metrics if len(fitted) == 1 else {})
    # min_steps may have raised the epochs; members fitted one after another (a CPU) count together
    sequential = len(members) > 1 and not stacked
    epochs = (sum if sequential else max)([len(m.history) for m in fitted] or [0]) or cfg.epochs
    ray.train.report({**final, "fold": first_fold, "seed": first_seed, "done": 1, "epoch": epochs, "epochs": epochs})


def train_driver_fn(config: dict[str, Any], data_ref: Any = None, plan: GridPlan | None = None) -> None:
    """Tune trainable: skip finished members, fit the others of the trial with a one-worker ``TorchTrainer``.

    ``config["trial"]`` is this trial's :class:`GridTrial`; ``plan`` and ``data_ref`` are the grid's, bound
    once by ``tune.with_parameters``."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    if plan is None:
        raise TypeError("train_driver_fn needs the grid's plan (tune.with_parameters(train_driver_fn, plan=...))")
    trial: GridTrial = config["trial"]
    # Propagated by Ray Train to its controller: on a busy 2-core machine starting a torch worker can take
    # longer than Ray's default 60 s.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(plan.worker_start_timeout_s))
    model = trial.model
    layout = RunLayout(plan.run_dir)
    todo = tuple((f, s) for f, s in trial.members if not layout.member_done(model, f, s))
    (fold0, seed0) = trial.members[0]
    if not todo:
        ray.tune.report({"done": 1, "fold": fold0, "seed": seed0, "skipped": 1, "epoch": 0})
        return
    use_gpu = plan.use_gpu and is_torch_model(model)
    # The trial's driver holds DRIVER_CPUS; its worker takes the rest of cpus_per_trial, so k concurrent
    # trials fit in k * cpus_per_trial CPUs (on a 2-CPU machine, 1-CPU workers beside drivers holding the
    # default 1 CPU each deadlock).
    resources = {"CPU": max(plan.cpus_per_trial - DRIVER_CPUS, DRIVER_CPUS)}
    if use_gpu:
        resources["GPU"] = plan.gpu_per_trial
    dirs = tuple(layout.member(model, f, s) for f, s in todo)
    work = TrialWork(train_config=plan.train_configs[model], model=model, members=todo, stacked=trial.stacked,
                     member_dirs=dirs, checkpoint_dir=layout.stack(model, todo) if trial.stacked else dirs[0],
                     splits_path=plan.splits_path, threads=max(1, round(plan.cpus_per_trial)),
                     tracking_uri=plan.tracking_uri, parent_run_id=plan.parent_run_id)  # fmt: skip
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"work": work, "data_ref": data_ref},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=trial_name(model, todo),
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=plan.max_failures),
            # Only the latest epoch is a resume point; a paper-width stack checkpoint is ~1.7 GB.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def grid_resources(cfg: ExperimentConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """GPU fraction per trial and how many trials run at once, from the cluster's resources."""
    gpus = float(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 1))
    use_gpu = gpus > 0 and cfg.training.device != "cpu"
    by_cpu = max(1, math.floor(cpus / cfg.grid.cpus_per_trial))
    concurrent = min(by_cpu, math.floor(gpus * cfg.grid.trials_per_gpu)) if use_gpu else by_cpu
    if cfg.grid.max_concurrent_trials:
        concurrent = min(concurrent, cfg.grid.max_concurrent_trials)
    return {"use_gpu": use_gpu, "gpu_per_trial": 1.0 / cfg.grid.trials_per_gpu, "max_concurrent_trials": max(1, concurrent)}


def run_grid(cfg: ExperimentConfig, run_dir: str | Path | None = None, *, progress: bool = True,
             evaluate: bool = True, tracking_uri: str | None = None) -> GridResult:  # fmt: skip
    """``qsmrim grid``: prepare the run, train the grid (:func:`train_grid`) and evaluate it (:func:`finish_grid`);
    each stage once."""
    t0 = time.perf_counter()
    run = prepare_run(cfg, run_dir_of(cfg, run_dir).resolve())
    result = train_grid(cfg, run, progress=progress, tracking_uri=tracking_uri)
    if not result["errors"]:
        finish_grid(result, evaluate=evaluate)
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def train_grid(cfg: ExperimentConfig, run: Path, *, progress: bool = True,
               tracking_uri: str | None = None) -> GridResult:  # fmt: skip
    """Train the grid of a prepared run (:func:`qsmrim.experiment.prepare_run`): start (or attach to) Ray, open the
    MLflow parent run, fit every trial. On failure the parent run is closed ``FAILED``; otherwise it stays open
    for :func:`finish_grid`."""
    import ray
    from ray import tune

    from qsmrim.grid.progress import TrialTable
    from qsmrim.tracking import mlflow_runs as mr

    t0 = time.perf_counter()
    layout = RunLayout(run)
    if not layout.splits.exists():
        raise FileNotFoundError(f"{run}: not prepared ({layout.splits.name} missing); prepare_run comes first")
    data = load_run_data(run, with_features=needs_radiomics(cfg.models))
    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2's placement-group cleaner asks the state API (served by the
        # dashboard) whether a finished trial's controller is gone; without it placement groups leak and the
        # next wave of trials waits for CPUs forever.
        ray.init(address=cfg.grid.address or os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING,
                 log_to_driver=False)  # fmt: skip
    res = grid_resources(cfg, ray.cluster_resources())
    arrays = {k: (v if not hasattr(v, "filename") else __import__("numpy").asarray(v)) for k, v in asdict(data).items()}
    # A list around the ref: with_parameters resolves its values, but not refs nested in containers, so each
    # trial passes the reference (not the arrays) on to its Train worker, which reads the store zero-copy.
    data_ref = [ray.put(arrays)]

    uri = mr.resolve_tracking_uri(tracking_uri)
    exp_id = mr.ensure_experiment(uri, cfg.grid.mlflow_experiment or f"qsmrim-{cfg.name}", mr.artifact_root(uri))
    from qsmrim.data import fingerprint

    dataset_hash = fingerprint([layout.lesions, layout.patch_spec])
    parent = mr.start_parent_run(
        uri, exp_id, run, name=f"grid-{cfg.name}", params=config_to_dict(cfg),
        tags={"git_commit": mr.git_commit() or "unknown", "dataset_hash": dataset_hash,
              **{f"version.{k}": v for k, v in mr.package_versions().items()}},
        artifacts=[layout.splits, layout.config],
    )  # fmt: skip
    plan = GridPlan(
        run_dir=run, splits_path=layout.splits, train_configs={m: member_config(cfg, m) for m in cfg.models},
        storage_path=str(Path(cfg.grid.storage_path).resolve()) if cfg.grid.storage_path else str(layout.ray_storage),
        max_failures=cfg.grid.max_failures, cpus_per_trial=cfg.grid.cpus_per_trial,
        worker_start_timeout_s=cfg.grid.worker_start_timeout_s, use_gpu=res["use_gpu"],
        gpu_per_trial=res["gpu_per_trial"], tracking_uri=uri, parent_run_id=parent,
    )  # fmt: skip
    n_folds = len(json.loads(layout.splits.read_text()))
    trials = grid_trials(cfg, n_folds)
    trainable = tune.with_resources(tune.with_parameters(train_driver_fn, data_ref=data_ref, plan=plan),
                                    {"cpu": DRIVER_CPUS})  # fmt: skip
    table = TrialTable(cfg.training.epochs, enabled=progress)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=res["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=f"grid-{cfg.name}", storage_path=plan.storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.grid.trial_max_failures),
                                  callbacks=[table])  # fmt: skip
    )
    with table:
        results = tuner.fit()
    errors = [(r.config, r.error) for r in results if r.error is not None]
    result = GridResult(run_dir=str(run), parent_run_id=parent, tracking_uri=uri, trials=len(results),
                        errors=[f"{_failed_trial_name(c)}: {e}" for c, e in errors],
                        wall_seconds=None, evaluation=None)  # fmt: skip
    if errors:
        mr.finish_run(uri, parent, status="FAILED")
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def _failed_trial_name(config: dict[str, Any] | None) -> str:
    """A failed trial's name; a trial killed while starting has no config to name it by."""
    if not config or "trial" not in config:
        return "a trial that failed before it started"
    return trial_name(config["trial"].model, config["trial"].members)


def finish_grid(result: GridResult, *, evaluate: bool = True) -> dict[str, Any]:
    """Evaluate a trained grid's run once (:func:`~qsmrim.training.evaluate_run.evaluate_run`), log its ``cv_*``
    metrics and evaluation folder to the grid's parent run and close it; returns the evaluation by label
    (empty with ``evaluate=False``)."""
    from qsmrim.tracking import mlflow_runs as mr

    uri, parent = result["tracking_uri"], result["parent_run_id"]
    if not evaluate:
        mr.finish_run(uri, parent)
        return {}
    from qsmrim.training.evaluate_run import evaluate_run

    t0 = time.perf_counter()
    run = Path(result["run_dir"])
    ev = evaluate_run(run)
    result["evaluation"] = mr.cv_metrics(ev)
    mr.finish_run(uri, parent, metrics=result["evaluation"], artifacts_dir=RunLayout(run).evaluation)
    result["wall_seconds"] = (result.get("wall_seconds") or 0.0) + time.perf_counter() - t0
    return ev
