"""Cohort radiomics on Dask: one task per subject (or balanced lesion chunk), one compute, a Parquet cache.

This module only schedules. The plan, the task body and the collector are
:mod:`qsmrim.radiomics.tasks`; the cache layout and its keys are :mod:`qsmrim.radiomics.cache`. Dask,
distributed and Ray are imported inside the functions that use them, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from qsmrim.data.errors import InputError
from qsmrim.radiomics.cache import (
    FEATURES_FILE,
    SUBJECTS_DIR,
    read_subject_features,
    subject_path,
    write_features,
)
from qsmrim.radiomics.cohort import SubjectFeatures
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, RadiomicsSettings
from qsmrim.radiomics.tasks import (
    ChunkCollector,
    ProgressCallback,
    SubjectPlan,
    plan_cohort,
    run_chunk,
    task_key,
)

if TYPE_CHECKING:
    from distributed import Client

    from qsmrim.data import Cohort, LesionSource
    from qsmrim.data.errors import Problem

__all__ = ["CohortFeatures", "extract_cohort"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CohortFeatures:
    """Result of :func:`extract_cohort`: the merged table and what was computed versus reused."""

    table: pd.DataFrame
    path: Path
    computed: tuple[str, ...]
    cached: tuple[str, ...]
    seconds: float
    scheduler: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_lesions(self) -> int:
        return len(self.table)


def extract_cohort(
    cohort: Cohort | str | Path,
    out_dir: str | Path,
    *,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    scheduler: str | Client | None = None,
    workers: int | None = None,
    chunk_lesions: int | None = None,
    on_progress: ProgressCallback | None = None,
    lesions: LesionSource | None = None,
) -> CohortFeatures:
    """Extract the 527 features of every lesion of a cohort, in parallel, resuming from ``out_dir``.

    Args:
        cohort: A :class:`qsmrim.data.Cohort`, or a BIDS root / CSV manifest to discover (its lesion maps
            from ``lesions``: derivatives folder and ``desc-``, default ``derivatives/lesions``).
        out_dir: Output folder (layout: :mod:`qsmrim.radiomics.cache`). Must be writable by this
            process; workers only read the input files, so they need the cohort's paths, not ``out_dir``.
        settings: Extraction settings (part of the cache key).
        scheduler: ``None`` or ``"local"``: a new ``distributed.LocalCluster`` of ``workers`` single-threaded
            processes. ``"tcp://host:port"``: attach to a running Dask scheduler. ``"ray"``: run the same
            graph on Ray through ``ray.util.dask.ray_dask_get`` (connects to ``RAY_ADDRESS`` if set).
            ``"sync"``: in this process, one task after another (debugging). A ``distributed.Client``
            is used as it is.
        workers: Worker processes for ``"local"`` (default: the CPUs this process may use) or CPUs for a
            local Ray; also sizes the lesion chunks.
        chunk_lesions: Target lesions per task; a subject is split into chunks of this to twice this size.
            By default about a quarter of an even share per worker, 16 to 64, so one large subject is
            spread over workers while each task still amortises loading the images.
        on_progress: Called as ``on_progress(lesions_done, lesions_total)`` while tasks finish.
        lesions: Where a BIDS root's lesion maps are (ignored for a :class:`~qsmrim.data.Cohort`).

    .. tip::
        Local worker processes are spawned: call this from a function or under
        ``if __name__ == "__main__":`` in scripts, as for any ``distributed.LocalCluster``.

    Returns:
        :class:`CohortFeatures` with the merged table, also written to ``out_dir/features.parquet``.

    Raises:
        InputError: after every other subject has finished, listing each subject that could not be
            extracted (named with the file, and lesion where relevant). Their Parquet files are not
            written; the merged table is not written either, so it never silently lacks subjects.
    """
    from qsmrim.data import Cohort, discover_cohort

    started = time.perf_counter()
    _check_scheduler(scheduler)
    if chunk_lesions is not None and (
        isinstance(chunk_lesions, bool) or not isinstance(chunk_lesions, int) or chunk_lesions < 1
    ):
        raise ValueError(f"chunk_lesions must be an int >= 1 or None, not {chunk_lesions!r}")
    n_workers = _worker_count(scheduler, workers)
    if not isinstance(cohort, Cohort):
        cohort = discover_cohort(cohort, lesions=lesions)
    out = Path(out_dir)
    (out / SUBJECTS_DIR).mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    todo, cached, problems = plan_cohort(cohort.subjects, out, settings, n_workers, chunk_lesions)
    total = sum(p.n_lesions for p in todo)
    timings["plan_s"] = time.perf_counter() - t0
    log.info("radiomics: %d subject(s) to compute (%d lesions), %d cached", len(todo), total, len(cached))
    scheduler_name = _describe(scheduler)
    t0 = time.perf_counter()
    computed: dict[str, SubjectFeatures] = {}
    if todo:
        run_problems, computed = _run(todo, settings, scheduler, n_workers, on_progress, total)
        problems += run_problems
    timings["compute_s"] = time.perf_counter() - t0
    if problems:
        raise InputError(problems)

    t0 = time.perf_counter()
    parts = [
        computed.get(s.subject) or read_subject_features(subject_path(out, s.subject)) for s in cohort.subjects
    ]
    path = out / FEATURES_FILE
    table = write_features(parts, path, settings)
    timings["merge_s"] = time.perf_counter() - t0
    seconds = time.perf_counter() - started
    log.info(
        "radiomics: %d lesions of %d subjects in %.1f s (plan %.1f s, compute %.1f s, merge %.1f s) -> %s",
        len(table),
        len(cohort.subjects),
        seconds,
        timings["plan_s"],
        timings["compute_s"],
        timings["merge_s"],
        path,
    )
    return CohortFeatures(
        table, path, tuple(p.files.subject for p in todo), tuple(cached), seconds, scheduler_name, timings
    )


# -- execution ------------------------------------------------------------------------------------------------


def _run(
    plans: list[SubjectPlan],
    settings: RadiomicsSettings,
    scheduler: str | Client | None,
    n_workers: int,
    on_progress: ProgressCallback | None,
    total: int,
) -> tuple[list[Problem], dict[str, SubjectFeatures]]:
    import dask

    tasks = []
    for plan in sorted(plans, key=lambda p: -p.n_lesions):  # largest first: the long tasks start early
        for k, lesions in enumerate(plan.chunks):
            with dask.annotate(priority=len(lesions)):
                tasks.append(
                    dask.delayed(run_chunk, pure=True)(
                        plan.files,
                        lesions,
                        settings,
                        k,
                        tuple(sorted(i for c in plan.chunks for i in c)) if k == 0 else None,
                        dask_key_name=task_key(plan, k),
                    )
                )
    collector = ChunkCollector(plans, settings, on_progress, total)
    if scheduler is None or scheduler == "local":
        from distributed import Client, LocalCluster

        with LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            with Client(cluster) as client:
                _compute_distributed(client, tasks, collector)
    elif isinstance(scheduler, str) and scheduler.startswith(_ADDRESS_PREFIXES):
        from distributed import Client

        with Client(scheduler) as client:
            _compute_distributed(client, tasks, collector)
    elif scheduler == "ray":
        for result in _compute_ray(tasks, n_workers):
            collector.add(result)
    elif scheduler == "sync":
        for result in dask.compute(*tasks, scheduler="sync"):
            collector.add(result)
    else:
        _compute_distributed(scheduler, tasks, collector)  # type: ignore[arg-type]
    return collector.problems, collector.finished


def _compute_distributed(client: Client, tasks: list[Any], collector: ChunkCollector) -> None:
    from distributed import as_completed

    futures = client.compute(tasks)
    origin = {f.key: t.key for f, t in zip(futures, tasks, strict=True)}
    for future in as_completed(futures):
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker after repeated worker deaths
            result = collector.failure(origin[future.key], exc)
        collector.add(result)
        future.release()


def _compute_ray(tasks: list[Any], n_workers: int) -> tuple[Any, ...]:
    import dask
    import ray
    from ray.util.dask import ray_dask_get

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=n_workers, include_dashboard=False)
        started = True
    try:
        return dask.compute(*tasks, scheduler=ray_dask_get)
    finally:
        if started:
            ray.shutdown()


# -- scheduler arguments --------------------------------------------------------------------------------------


_ADDRESS_PREFIXES = ("tcp://", "tls://", "inproc://", "ucx://")


def _check_scheduler(scheduler: object) -> None:
    if scheduler is None or scheduler in ("local", "sync", "ray") or _is_client(scheduler):
        return
    if isinstance(scheduler, str) and scheduler.startswith(_ADDRESS_PREFIXES):
        return
    raise ValueError(
        "scheduler must be None, 'local', 'sync', 'ray', a 'tcp://host:port' address or a distributed.Client, "
        f"not {scheduler!r}"
    )


def _is_client(obj: object) -> bool:
    return type(obj).__name__ == "Client" and type(obj).__module__.startswith("distributed")


def _worker_count(scheduler: str | Client | None, workers: int | None) -> int:
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, not {workers!r}")
        return workers
    if _is_client(scheduler):
        return max(1, len(scheduler.scheduler_info().get("workers", {})))  # type: ignore[union-attr]
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _describe(scheduler: str | Client | None) -> str:
    if scheduler is None:
        return "local"
    if isinstance(scheduler, str):
        return scheduler
    return f"client:{getattr(scheduler, 'scheduler', None) and scheduler.scheduler.address}"
