"""The data stage of an experiment: cohort (synthesized when no root is given), validation, lesion table, patches.

Writes into ``<run>/prepared`` and skips work whose outputs are already there with the same inputs, so a
crashed run resumes where it stopped. :func:`qsmrim.experiment.prepare_run` adds features and splits on top;
:func:`qsmrim.pipeline.run_pipeline` runs every stage of DESIGN §1.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from qsmrim.atomic import atomic_path
from qsmrim.config import ExperimentConfig, config_to_dict
from qsmrim.data import (
    InputError,
    LesionSource,
    PatchSpec,
    SynthConfig,
    build_lesion_table,
    build_patch_cache,
    discover_cohort,
    extract_patches,
    fingerprint,
    synthesize_cohort,
    validate_cohort,
)
from qsmrim.data.fingerprint import remembered_digests
from qsmrim.data.patches import patch_cache_is_current, patch_cache_key

__all__ = ["PipelineResult", "prepare_cohort", "synthesize_once"]

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """What the pipeline made: paths of its outputs and a summary per stage."""

    out_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, object] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def synthesize_once(root: Path, n_subjects: int, seed: int, synth: SynthConfig, *, first_subject: int = 1,
                    sessions: int | None = None) -> Path:  # fmt: skip
    """Synthesize into ``root`` unless a stamp shows the same request was already written there."""
    stamp = root / ".synth.json"
    want = {"subjects": n_subjects, "first": first_subject, "seed": seed, **config_to_dict(synth)}
    if sessions is not None:  # only then, so stamps written before sessions existed still match
        want["sessions"] = sessions
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        log.info("reusing synthetic cohort %s", root)
        return root
    synthesize_cohort(root, n_subjects, seed, config=synth, first_subject=first_subject, sessions=sessions,
                      progress=True)  # fmt: skip
    stamp.write_text(json.dumps(want))
    return root


def _synth_if_needed(cfg: ExperimentConfig, out_dir: Path) -> Path:
    if cfg.data.root:
        return Path(cfg.data.root)
    if not cfg.data.synthesize:  # a config built in code; load_config refuses the same earlier
        from qsmrim.config import ConfigError, no_cohort_message

        raise ConfigError(f"experiment {cfg.name!r}: {no_cohort_message(cfg.data)}")
    synth = SynthConfig(shape=cfg.data.synth_shape, difficulty=cfg.data.synth_difficulty)
    return synthesize_once(out_dir / "cohort", cfg.data.synth_subjects, cfg.data.synth_seed, synth,
                           sessions=cfg.data.synth_sessions)  # fmt: skip


_TABLE_KEY = "lesion-table-v1"


def _cached_table(root: Path, out_dir: Path, lesions: LesionSource):
    """``(cohort, lesion table)`` when ``out_dir`` holds a table built from the cohort's current files, else None
    (no NIfTI is decoded: the key hashes file bytes)."""
    import pandas as pd

    table_path, key_path = out_dir / "lesions.parquet", out_dir / "lesions.key"
    try:
        cohort = discover_cohort(root, lesions=lesions)
        if table_path.exists() and key_path.exists() and key_path.read_text() == fingerprint(cohort.files(), _TABLE_KEY):
            return cohort, pd.read_parquet(table_path)
    except (InputError, OSError, ValueError):
        pass  # validation will say what is wrong
    return None


def prepare_cohort(cfg: ExperimentConfig, out_dir: str | Path) -> PipelineResult:
    """Synthesize (if no root is given), validate, and build the lesion table and patch cache."""
    with remembered_digests():  # the cache keys below hash the same files: once is enough
        return _prepare_cohort(cfg, out_dir)


def _prepare_cohort(cfg: ExperimentConfig, out_dir: str | Path) -> PipelineResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = PipelineResult(out_dir=out_dir)
    t = time.perf_counter()
    root = _synth_if_needed(cfg, out_dir)
    res.seconds["synth"] = time.perf_counter() - t
    res.outputs["cohort"] = root

    t = time.perf_counter()
    spec = PatchSpec(cfg.data.patch_size)
    # Cut the patches while validation has each subject's volumes in memory, unless the cache is current:
    # the NIfTIs are then read once, not twice.
    prebuilt: dict = {}
    lesions = cfg.data.lesion_source()
    cached = _cached_table(root, out_dir, lesions)
    current = cached is not None and patch_cache_is_current(out_dir, patch_cache_key(*cached, spec))
    keep = None if current else (
        lambda vol: prebuilt.__setitem__(vol.subject, (list(vol.lesion_indices), extract_patches(vol, None, spec))))
    report = validate_cohort(root, progress=True, on_subject=keep, lesions=lesions)
    if not report.ok:
        raise InputError(list(report.problems))
    res.summary["cohort"] = report.summary()
    res.seconds["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    table_path = out_dir / "lesions.parquet"
    if cached is not None:
        cohort, table = cached
    else:
        cohort = discover_cohort(root, lesions=lesions)
        table = report.table if report.table is not None else build_lesion_table(cohort)
        with atomic_path(table_path) as tmp:
            table.to_parquet(tmp, index=False)
        (out_dir / "lesions.key").write_text(fingerprint(cohort.files(), _TABLE_KEY))
    res.outputs["lesions"] = table_path
    res.seconds["lesions"] = time.perf_counter() - t

    t = time.perf_counter()
    patches = build_patch_cache(cohort, table, out_dir, spec, progress=True, prebuilt=prebuilt)
    res.outputs["patches"] = out_dir / "patches.npy"
    res.summary["patches"] = {"shape": list(patches.shape), "dtype": str(patches.dtype)}
    res.seconds["patches"] = time.perf_counter() - t
    return res
