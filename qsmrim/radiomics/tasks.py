"""A cohort's radiomics cut into tasks, whatever runs them: the plan, the task body, the collector.

:func:`plan_cohort` skips subjects whose cache file is current and splits the others into lesion chunks;
:func:`run_chunk` is the pure task body (features of some lesions of one subject, or the error that
stopped them: it never raises); :class:`ChunkCollector` gathers the results on the client and writes each
subject's Parquet (:mod:`qsmrim.radiomics.cache`) once all its chunks are in. The scheduler that runs the
tasks (a Dask cluster, Dask on Ray, or in-process) is :mod:`qsmrim.fanout.features`'s business; nothing
here imports Dask or Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qsmrim.data.errors import InputError, Problem
from qsmrim.radiomics.cache import stored_key, subject_key, subject_path, write_subject_features
from qsmrim.radiomics.cohort import SubjectFeatures, subject_features
from qsmrim.radiomics.settings import RadiomicsSettings

if TYPE_CHECKING:
    from qsmrim.data import SubjectFiles

__all__ = [
    "ChunkCollector",
    "ChunkResult",
    "ProgressCallback",
    "SubjectPlan",
    "plan_cohort",
    "run_chunk",
    "task_key",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SubjectPlan:
    """One subject to compute: its files, cache key, output file and lesion chunks (one task each)."""

    files: SubjectFiles
    key: str
    path: Path
    chunks: tuple[tuple[int, ...], ...] = ()

    @property
    def n_lesions(self) -> int:
        return sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class ChunkResult:
    """What a task returns: compact arrays, or the error that stopped it (tasks never raise, so one bad
    subject cannot abort a single ``dask.compute`` on the Ray scheduler)."""

    subject: str
    chunk: int
    features: SubjectFeatures | None = None
    problems: tuple[Problem, ...] = field(default_factory=tuple)


def task_key(plan: SubjectPlan, chunk: int) -> str:
    """The scheduler's name of chunk ``chunk`` of ``plan`` (``radiomics-<key[:16]>-<scan id>-<chunk>``).

    The scan id is part of the name: two scans with byte-identical inputs (a copied session) have the same
    content key, and the scheduler would run their tasks once and answer only one of them.
    """
    return f"{_task_prefix(plan)}{chunk}"


def plan_cohort(
    subjects: Sequence[SubjectFiles],
    out: Path,
    settings: RadiomicsSettings,
    n_workers: int,
    chunk_lesions: int | None,
) -> tuple[list[SubjectPlan], list[str], list[Problem]]:
    """The subjects to compute (chunked), the subjects whose cache is current, and the inputs that failed."""
    plans: list[SubjectPlan] = []
    cached: list[str] = []
    problems: list[Problem] = []
    indices: dict[str, list[int]] = {}
    for files in subjects:
        path = subject_path(out, files.subject)
        try:
            key = subject_key(files, settings)
        except OSError as exc:
            problems.append(Problem(f"subject {files.subject}", f"cannot read input: {exc}"))
            continue
        if stored_key(path) == key:
            cached.append(files.subject)
            continue
        try:
            indices[files.subject] = _lesion_indices(files)
        except InputError as exc:
            problems += [Problem(f"subject {files.subject}: {p.where}", p.what) for p in exc.problems]
            continue
        plans.append(SubjectPlan(files, key, path))
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


def run_chunk(
    files: SubjectFiles,
    lesions: tuple[int, ...],
    settings: RadiomicsSettings,
    chunk: int,
    expect: tuple[int, ...] | None,
) -> ChunkResult:
    """The task body: features of some lesions of one subject, or the error that prevented them."""
    try:
        features = subject_features(files, lesions, settings, expect_lesions=expect)
    except InputError as exc:
        return ChunkResult(files.subject, chunk, problems=tuple(exc.problems))
    except Exception as exc:  # noqa: BLE001 - report, do not abort the whole compute
        log.exception("subject %s: unexpected failure", files.subject)
        return ChunkResult(
            files.subject,
            chunk,
            problems=(Problem(f"subject {files.subject}", f"{type(exc).__name__}: {exc}"),),
        )
    return ChunkResult(files.subject, chunk, features=features)


class ChunkCollector:
    """Gathers chunk results on the client; writes each subject's Parquet once all its chunks are in."""

    def __init__(
        self,
        plans: list[SubjectPlan],
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

    def failure(self, key: str, exc: BaseException) -> ChunkResult:
        """A chunk whose task itself failed (not the extraction): name its subject from the task key."""
        for plan in self.plans.values():
            prefix = _task_prefix(plan)
            if str(key).startswith(prefix):
                chunk = int(str(key)[len(prefix) :])
                what = f"task failed on the cluster: {type(exc).__name__}: {exc}"
                return ChunkResult(
                    plan.files.subject, chunk, problems=(Problem(f"subject {plan.files.subject}", what),)
                )
        raise exc

    def add(self, result: ChunkResult) -> None:
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
            write_subject_features(features, plan.path, plan.key, self.settings)
            self.finished[result.subject] = features
            del self.parts[result.subject]
            log.debug("subject %s: %d lesions -> %s", result.subject, len(features), plan.path)


def _task_prefix(plan: SubjectPlan) -> str:
    return f"radiomics-{plan.key[:16]}-{plan.files.subject}-"


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
    from qsmrim.data.cohort import lesion_instances

    try:
        data = read_canonical(files.lesions, dtype=None).data  # stored integers: 2^24 + 1 stays 2^24 + 1
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a broken file
        raise InputError(f"unreadable lesion map: {exc}", where=files.lesions) from exc
    instances = lesion_instances(data, files.lesions_kind, str(files.lesions))
    return [int(i) for i in np.unique(instances) if i > 0]
