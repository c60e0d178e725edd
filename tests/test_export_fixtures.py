"""Shared, built-once artefacts for the export and registry tests (no tests here).

A real tiny run: the session's synthetic cohort, fake 527-column radiomics, labels re-drawn so both folds
hold rim+ lesions (the 4-subject cohort has only two), and 2 folds x 3 seeds of a narrow QSMRim-Net trained
for one epoch with ``fit_member``; then its ensemble exported once. Built on first use and cached in this
module, so ``test_export.py`` and ``test_registry.py`` share one training and one export per session
(fixtures imported into two modules would each run once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qsmrim.data import PatchSpec, build_lesion_table, build_patch_cache, discover_cohort
from qsmrim.radiomics import FEATURE_NAMES
from qsmrim.training import LesionDataset, Member, TrainConfig, fit_member, make_splits
from qsmrim.training.layout import member_dir

TINY = {"base_channels": 2}
MODEL = "qsmrimnet"


@dataclass(frozen=True)
class TinyRun:
    run_dir: Path
    data: LesionDataset
    members: list[Member]
    onnx: Path  # exported from run_dir (inline weights, verified at export)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole cohort's raw inputs as a client sends them (float32; one NaN and one Inf)."""
        radiomics = self.data.radiomics.astype(np.float32)
        radiomics[0, 3] = np.nan
        radiomics[1, 7] = np.inf
        return np.ascontiguousarray(self.data.patches, dtype=np.float32), radiomics


_CACHE: dict[str, object] = {}


def tiny_run(tmp_path_factory, synth_root: Path) -> TinyRun:
    if "run" not in _CACHE:
        _CACHE["run"] = _build(tmp_path_factory.mktemp("tiny-run"), synth_root)
    return _CACHE["run"]


def external_export(run: TinyRun) -> Path:
    """The same members exported with ``external_data=True`` (the flag path; weights in ``model.onnx.data``)."""
    from qsmrim.export import export_ensemble

    if "external" not in _CACHE:
        out = run.onnx.parent.parent / "external" / "model.onnx"
        _CACHE["external"] = export_ensemble(run.members, out, external_data=True, verify=False)
    return _CACHE["external"]


def _build(base: Path, synth_root: Path) -> TinyRun:
    from qsmrim.export import export_ensemble

    cohort = discover_cohort(synth_root)
    table = build_lesion_table(cohort)
    patches = build_patch_cache(cohort, table, base / "prepared", PatchSpec())
    rng = np.random.default_rng(0)
    table = table.assign(rim=(rng.random(len(table)) < 0.3).astype(int))
    values = rng.normal(size=(len(table), len(FEATURE_NAMES))) * 10 + 5
    values[:, :8] += 3 * table["rim"].to_numpy()[:, None]  # a few informative features
    values[2, 5] = np.nan
    features = pd.concat(
        [table[["subject", "lesion"]], pd.DataFrame(values, columns=list(FEATURE_NAMES))], axis=1
    )
    data = LesionDataset.from_tables(table, patches, features, tuple(FEATURE_NAMES))
    splits = make_splits(data.rim_counts(), n_folds=2, seed=0)
    cfg = TrainConfig(model=MODEL, model_kwargs=TINY, epochs=1, batch_size=32, inner_val_fraction=0.0, device="cpu",
                      n_folds=2, seeds=(0, 1, 2))  # fmt: skip
    run_dir = base / "run"
    members = [fit_member(cfg, data, splits, fold, seed, out_dir=member_dir(run_dir, MODEL, fold, seed))
               for fold in range(2) for seed in cfg.seeds]  # fmt: skip
    onnx = export_ensemble(run_dir, base / "export" / "model.onnx")
    loaded = [Member.load(member_dir(run_dir, MODEL, m.fold, m.seed)) for m in members]
    return TinyRun(run_dir, data, loaded, onnx)
