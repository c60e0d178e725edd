"""Cohort radiomics on Dask: one task per subject (or balanced lesion chunk), one compute, a Parquet cache.

Dask and Ray are imported inside the functions that use them, so importing this module (and
:mod:`qsmrim.radiomics`) stays cheap and free of both.

Layout of ``out_dir``::

    subjects/<subject>.parquet    one file per subject, written as soon as the subject is complete:
                                  subject, lesion, status, reason, features (a fixed-size list of 527
                                  float64 in FEATURE_NAMES order; one column, as 531-column Parquet files
                                  of ~25 rows cost ~10x more to write and read)
    features.parquet              the merged table: subject, lesion, status, reason, 527 feature columns

Each subject file carries a content hash of its inputs (QSM and lesion map bytes), the settings and the
extraction code version in its Parquet metadata; a re-run skips subjects whose hash matches, so a crashed
run resumes and a changed input or setting recomputes. Files are written to a temporary name and renamed,
so a failure never leaves a partial Parquet behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from qsmrim.data.errors import InputError, Problem
from qsmrim.radiomics.cohort import FEATURE_TABLE_COLUMNS, ID_COLUMNS, SubjectFeatures, subject_features
from qsmrim.radiomics.feature_names import FEATURE_NAMES, N_FEATURES
from qsmrim.radiomics.settings import DEFAULT_SETTINGS, PYRADIOMICS_VERSION, RadiomicsSettings

if TYPE_CHECKING:
    from distributed import Client

    from qsmrim.data import Cohort, SubjectFiles

__all__ = [
    "CohortFeatures",
    "extract_cohort",
    "subject_key",
    "read_features",
    "read_subject_features",
    "FEATURES_FILE",
    "SUBJECTS_DIR",
]

log = logging.getLogger(__name__)

FEATURES_FILE = "features.parquet"
SUBJECTS_DIR = "subjects"
EXTRACTION_VERSION = "1"
"""Bump when a code change alters feature values or the table layout: every cached subject is recomputed."""

_META_KEY = b"qsmrim.radiomics"
ProgressCallback = Callable[[int, int], None]


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


@dataclass(frozen=True)
class _SubjectPlan:
    files: SubjectFiles
    key: str
    path: Path
    chunks: tuple[tuple[int, ...], ...] = ()

    @property
    def n_lesions(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class _ChunkResult:
    """What a task returns: compact arrays, or the error that stopped it (tasks never raise, so one bad
    subject cannot abort a single ``dask.compute`` on the Ray scheduler)."""

    subject: str
    chunk: int
    features: SubjectFeatures | None = None
    problems: tuple[Problem, ...] = field(default_factory=tuple)


def extract_cohort(
    cohort: Cohort | str | Path,
    out_dir: str | Path,
    *,
    settings: RadiomicsSettings = DEFAULT_SETTINGS,
    scheduler: str | Client | None = None,
    workers: int | None = None,
    chunk_lesions: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> CohortFeatures:
    """Extract the 527 features of every lesion of a cohort, in parallel, resuming from ``out_dir``.

    Args:
        cohort: A :class:`qsmrim.data.Cohort`, or a BIDS root / CSV manifest to discover.
        out_dir: Output folder (see the module docstring for its layout). Must be writable by this
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
    from qsmrim.data import discover_cohort

    started = time.perf_counter()
    _check_scheduler(scheduler)
    if chunk_lesions is not None and (
        isinstance(chunk_lesions, bool) or not isinstance(chunk_lesions, int) or chunk_lesions < 1
    ):
        raise ValueError(f"chunk_lesions must be an int >= 1 or None, not {chunk_lesions!r}")
    n_workers = _worker_count(scheduler, workers)
    if not isinstance(cohort, tuple(_cohort_types())):
        cohort = discover_cohort(cohort)
    out = Path(out_dir)
    (out / SUBJECTS_DIR).mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    todo, cached, problems = _plan(cohort.subjects, out, settings, n_workers, chunk_lesions)
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
        computed.get(s.subject) or read_subject_features(_subject_path(out, s.subject))
        for s in cohort.subjects
    ]
    arrow = _wide_table(parts)
    path = out / FEATURES_FILE
    _write_parquet(arrow, path, {"subjects": len(cohort.subjects), **_provenance(settings)})
    table = arrow.to_pandas()
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


def read_features(out_dir: str | Path) -> pd.DataFrame:
    """The merged table written by :func:`extract_cohort` (:data:`FEATURE_TABLE_COLUMNS`)."""
    return pd.read_parquet(Path(out_dir) / FEATURES_FILE)


def read_subject_features(path: str | Path) -> SubjectFeatures:
    """One per-subject file of ``out_dir/subjects/`` as arrays (``.to_frame()`` gives the wide table)."""
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    values = arrow.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    subject = json.loads((arrow.schema.metadata or {}).get(_META_KEY, b"{}")).get("subject", "")
    return SubjectFeatures(
        subject,
        arrow.column("lesion").to_numpy().astype(np.int32),
        tuple(arrow.column("status").to_pylist()),
        tuple(arrow.column("reason").to_pylist()),
        values.reshape(-1, N_FEATURES).astype(np.float64, copy=False),
    )


def subject_key(files: SubjectFiles, settings: RadiomicsSettings = DEFAULT_SETTINGS) -> str:
    """Content hash of everything a subject's features depend on: image bytes, settings, code version."""
    from qsmrim.data import file_digest

    h = hashlib.sha256()
    for part in (
        EXTRACTION_VERSION,
        settings.digest,
        hashlib.sha256("\n".join(FEATURE_NAMES).encode()).hexdigest(),
        files.lesions_kind,
        file_digest(files.qsm),
        file_digest(files.lesions),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


# -- planning -------------------------------------------------------------------------------------------------


def _plan(
    subjects: Sequence[SubjectFiles],
    out: Path,
    settings: RadiomicsSettings,
    n_workers: int,
    chunk_lesions: int | None,
) -> tuple[list[_SubjectPlan], list[str], list[Problem]]:
    plans: list[_SubjectPlan] = []
    cached: list[str] = []
    problems: list[Problem] = []
    indices: dict[str, list[int]] = {}
    for files in subjects:
        path = _subject_path(out, files.subject)
        try:
            key = subject_key(files, settings)
        except OSError as exc:
            problems.append(Problem(f"subject {files.subject}", f"cannot read input: {exc}"))
            continue
        if _stored_key(path) == key:
            cached.append(files.subject)
            continue
        try:
            indices[files.subject] = _lesion_indices(files)
        except InputError as exc:
            problems += [Problem(f"subject {files.subject}: {p.where}", p.what) for p in exc.problems]
            continue
        plans.append(_SubjectPlan(files, key, path))
    total = sum(len(v) for v in indices.values())
    size = chunk_lesions or min(64, max(16, math.ceil(total / (4 * max(1, n_workers)))))
    out_plans = []
    for plan in plans:
        idx = indices[plan.files.subject]
        n_chunks = max(1, len(idx) // size)  # chunks of size..2*size lesions: each one loads the images
        # interleaved chunks: lesion sizes vary with index order less than with position in the list
        chunks = tuple(tuple(idx[k::n_chunks]) for k in range(n_chunks)) if idx else ((),)
        out_plans.append(dataclasses.replace(plan, chunks=chunks))
    return out_plans, cached, problems


def _lesion_indices(files: SubjectFiles) -> list[int]:
    """Lesion indices from the label TSV when there is one (cheap), else from the lesion map itself.

    The first chunk of each subject re-checks the plan against the map (``expect_lesions``).
    """
    from qsmrim.data import read_labels

    if files.lesions_kind == "dseg" and files.labels is not None:
        labels, label_problems = read_labels(files.labels)
        if not label_problems and labels:
            return sorted(labels)
    from qsmrim.data import read_canonical
    from qsmrim.data.cohort import instances_from_mask

    try:
        data = read_canonical(files.lesions).data
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a broken file
        raise InputError(f"unreadable lesion map: {exc}", where=files.lesions) from exc
    instances = instances_from_mask(data) if files.lesions_kind == "mask" else np.rint(data).astype(np.int64)
    return [int(i) for i in np.unique(instances) if i > 0]


# -- execution ------------------------------------------------------------------------------------------------


def _run_chunk(
    files: SubjectFiles,
    lesions: tuple[int, ...],
    settings: RadiomicsSettings,
    chunk: int,
    expect: tuple[int, ...] | None,
) -> _ChunkResult:
    """The task body: features of some lesions of one subject, or the error that prevented them."""
    try:
        features = subject_features(files, lesions, settings, expect_lesions=expect)
    except InputError as exc:
        return _ChunkResult(files.subject, chunk, problems=tuple(exc.problems))
    except Exception as exc:  # noqa: BLE001 - report, do not abort the whole compute
        log.exception("subject %s: unexpected failure", files.subject)
        return _ChunkResult(
            files.subject,
            chunk,
            problems=(Problem(f"subject {files.subject}", f"{type(exc).__name__}: {exc}"),),
        )
    return _ChunkResult(files.subject, chunk, features=features)


def _run(
    plans: list[_SubjectPlan],
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
                    dask.delayed(_run_chunk, pure=True)(
                        plan.files,
                        lesions,
                        settings,
                        k,
                        tuple(sorted(i for c in plan.chunks for i in c)) if k == 0 else None,
                        dask_key_name=f"radiomics-{plan.key[:16]}-{k}",
                    )
                )
    collector = _Collector(plans, settings, on_progress, total)
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


def _compute_distributed(client: Client, tasks: list[Any], collector: _Collector) -> None:
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


class _Collector:
    """Gathers chunk results on the client; writes each subject's Parquet once all its chunks are in."""

    def __init__(
        self,
        plans: list[_SubjectPlan],
        settings: RadiomicsSettings,
        on_progress: ProgressCallback | None,
        total: int,
    ):
        self.plans = {p.files.subject: p for p in plans}
        self.parts: dict[str, dict[int, SubjectFeatures]] = {s: {} for s in self.plans}
        self.finished: dict[str, SubjectFeatures] = {}
        self.failed: set[str] = set()
        self.problems: list[Problem] = []
        self.settings = settings
        self.on_progress = on_progress
        self.total = total
        self.done = 0

    def failure(self, task_key: str, exc: BaseException) -> _ChunkResult:
        """A chunk whose task itself failed (not the extraction): name its subject from the task key."""
        for plan in self.plans.values():
            prefix = f"radiomics-{plan.key[:16]}-"
            if str(task_key).startswith(prefix):
                chunk = int(str(task_key)[len(prefix) :])
                what = f"task failed on the cluster: {type(exc).__name__}: {exc}"
                return _ChunkResult(
                    plan.files.subject, chunk, problems=(Problem(f"subject {plan.files.subject}", what),)
                )
        raise exc

    def add(self, result: _ChunkResult) -> None:
        plan = self.plans[result.subject]
        self.done += len(plan.chunks[result.chunk])
        if self.on_progress is not None:
            self.on_progress(self.done, self.total)
        if result.features is None:
            if result.subject not in self.failed:
                self.failed.add(result.subject)
                self.problems += list(result.problems)
            return
        if result.subject in self.failed:
            return
        parts = self.parts[result.subject]
        parts[result.chunk] = result.features
        if len(parts) == len(plan.chunks):
            features = SubjectFeatures.concat([parts[k] for k in sorted(parts)])
            meta = {"key": plan.key, "subject": plan.files.subject, **_provenance(self.settings)}
            _write_parquet(_subject_table(features), plan.path, meta)
            self.finished[result.subject] = features
            del self.parts[result.subject]
            log.debug("subject %s: %d lesions -> %s", result.subject, len(features), plan.path)


# -- Parquet --------------------------------------------------------------------------------------------------


def _subject_table(features: SubjectFeatures) -> Any:
    """Arrow table of one subject with the 527 values as one fixed-size-list column."""
    import pyarrow as pa

    values = pa.array(np.ascontiguousarray(features.values, dtype=np.float64).reshape(-1))
    return pa.Table.from_arrays(
        [*_id_arrays(features), pa.FixedSizeListArray.from_arrays(values, N_FEATURES)],
        names=[*ID_COLUMNS, "features"],
    )


def _wide_table(parts: Sequence[SubjectFeatures]) -> Any:
    """The merged Arrow table: id columns, then one float64 column per feature, in cohort order."""
    import pyarrow as pa

    ids = [pa.concat_arrays(list(cols)) for cols in zip(*(_id_arrays(p) for p in parts), strict=True)]
    if not parts:
        ids = [pa.array([], t) for t in (pa.string(), pa.int32(), pa.string(), pa.string())]
    values = np.concatenate([p.values for p in parts]) if parts else np.empty((0, N_FEATURES))
    columns = [pa.array(np.ascontiguousarray(values[:, j])) for j in range(N_FEATURES)]
    return pa.Table.from_arrays([*ids, *columns], names=list(FEATURE_TABLE_COLUMNS))


def _id_arrays(features: SubjectFeatures) -> list[Any]:
    import pyarrow as pa

    return [
        pa.array([features.subject] * len(features), pa.string()),
        pa.array(np.asarray(features.lesions, dtype=np.int32), pa.int32()),
        pa.array(list(features.status), pa.string()),
        pa.array(list(features.reason), pa.string()),
    ]


def _write_parquet(arrow: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write an Arrow table atomically: a temporary file in the same folder, then ``os.replace``."""
    import pyarrow.parquet as pq

    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(arrow, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stored_key(path: Path) -> str | None:
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(_META_KEY, b"{}")).get("key")
    except Exception:  # noqa: BLE001 - an unreadable cache file is simply recomputed
        log.warning("ignoring unreadable cache file %s", path)
        return None


def _provenance(settings: RadiomicsSettings) -> dict[str, Any]:
    import pywt
    import radiomics

    return {
        "extraction_version": EXTRACTION_VERSION,
        "settings": dataclasses.asdict(settings),
        "settings_digest": settings.digest,
        "pyradiomics": str(getattr(radiomics, "__version__", PYRADIOMICS_VERSION)),
        "pywavelets": pywt.__version__,
        "numpy": np.__version__,
        "n_features": len(FEATURE_NAMES),
    }


# -- small helpers --------------------------------------------------------------------------------------------


def _cohort_types() -> list[type]:
    from qsmrim.data import Cohort

    return [Cohort]


def _subject_path(out: Path, subject: str) -> Path:
    return out / SUBJECTS_DIR / f"{_safe_name(subject)}.parquet"


def _safe_name(subject: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in subject) or "_"


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
