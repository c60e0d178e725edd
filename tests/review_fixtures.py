"""Shared builders for the review tests (no tests here): a run folder over the session's synthetic cohort and a
hand-made lesion TSV with its QC sidecar.

The run holds real members (tiny APRL(NN) weights saved by :class:`~qsmrim.training.member.Member`) whose
test-fold predictions are a made-up table over the cohort's real lesions, so ``evaluate_run`` draws real
thumbnails from the cohort named in ``config.resolved.json``. Labels and probabilities are chosen here so every
outcome (TP, FP, FN, TN) occurs in both folds; tests work out what to expect from :func:`toy_predictions`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from qsmrim.data import build_lesion_table, discover_cohort
from qsmrim.models import build_model
from qsmrim.training.layout import member_dir
from qsmrim.training.member import Member

NN_KWARGS = {"n_radiomics": 2, "base_channels": 4}
SEEDS = (0, 1, 2)
THRESHOLD = 0.5


def toy_predictions(synth_root: Path) -> pd.DataFrame:
    """Every lesion of the cohort with a fold (subjects alternate), a label and one probability per seed.

    Labels: every third lesion rim+. Probabilities: rim+ lesions mostly high, rim- mostly low, with a few of
    each on the wrong side, seeded so the table is the same on every call.
    """
    table = build_lesion_table(discover_cohort(synth_root))
    subjects = sorted(table["subject"].unique())
    rng = np.random.default_rng(3)
    rim = (np.arange(len(table)) % 3 == 0).astype(int)
    base = np.where(rim == 1, rng.uniform(0.35, 0.95, len(table)), rng.uniform(0.02, 0.6, len(table)))
    out = pd.DataFrame({
        "subject": table["subject"].astype(str),
        "lesion": table["lesion"].astype(int),
        "fold": [subjects.index(s) % 2 for s in table["subject"]],
        "rim": rim,
    })  # fmt: skip
    for seed in SEEDS:
        out[f"p{seed}"] = np.clip(base + rng.normal(0, 0.08, len(table)), 0.001, 0.999).round(3)
    return out


def toy_run(base: Path, synth_root: Path) -> Path:
    """A run folder: 2 folds x 3 seeds of APRL(NN) with :func:`toy_predictions`, member thresholds 0.5."""
    run = base / "toy-run"
    preds = toy_predictions(synth_root)
    for fold in (0, 1):
        rows = preds[preds["fold"] == fold]
        for seed in SEEDS:
            p = rows[["subject", "lesion", "fold", "rim"]].assign(seed=seed, prob=rows[f"p{seed}"].to_numpy())
            m = Member("aprl-nn", NN_KWARGS, fold, seed, {"paper": THRESHOLD, "honest": THRESHOLD}, None, (),
                       model=build_model("aprl-nn", **NN_KWARGS), predictions=p.reset_index(drop=True))  # fmt: skip
            m.save(member_dir(run, "aprl-nn", fold, seed))
    (run / "config.resolved.json").write_text(json.dumps({"data": {"root": str(synth_root)}}))
    return run


def toy_lesion_tsv(anat: Path, scan: str, n: int = 12, *, review: bool = True, qc: dict | None = None) -> Path:
    """A ``qsmrim predict``-style lesion TSV of ``n`` lesions (indices 1..n) and, with ``qc``, its sidecar.

    Lesion k has prob ``(n + 1 - k) / (n + 1)`` reversed for even k, so the file order is not the review
    order; lesions with prob > 0.7 are rim+, and with ``review`` those with prob >= 0.4 are flagged.
    """
    anat.mkdir(parents=True, exist_ok=True)
    k = np.arange(1, n + 1)
    prob = np.where(k % 2 == 0, k / (n + 1), (n + 1 - k) / (n + 1)).round(4)
    table = pd.DataFrame({
        "index": k, "centroid_mm_x": 1.5 * k, "centroid_mm_y": -2.0, "centroid_mm_z": 3.0, "volume_mm3": 10.0 * k,
        "prob": prob, "votes": np.round(prob * 5).astype(int), "spread": 0.05, "rim": (prob > 0.7).astype(int),
    })  # fmt: skip
    if review:
        table["review"] = (prob >= 0.4).astype(int)
    tsv = anat / f"sub-{scan}_desc-rim_lesions.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    if qc is not None:
        tsv.with_suffix(".json").write_text(json.dumps(qc))
    return tsv
