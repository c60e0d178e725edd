"""Evaluate a finished run: fold ensembles of every model, both threshold protocols, one report.

Besides the report (``report.md``, ``report.html``, ``evaluation.json``, PNGs) the evaluation folder gets
``oof.parquet``: one row per (model, lesion) out of fold, labelled or not, with every member's probability
(:func:`qsmrim.training.ensemble.oof_table`; columns in ``docs/evaluation.md``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from qsmrim.atomic import atomic_path
from qsmrim.training.ensemble import fold_ensemble_predictions, oof_table
from qsmrim.training.layout import RunLayout, iter_member_dirs
from qsmrim.training.member import Member

if TYPE_CHECKING:
    from qsmrim.data import SubjectVolumes

__all__ = ["OOF_FILE", "evaluate_run"]

OOF_FILE = "oof.parquet"
"""File name of the per-lesion out-of-fold table in the evaluation folder."""

log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, out_dir: str | Path | None = None, *, with_figures: bool = True) -> dict[str, Any]:
    """Evaluate every model of a run and write ``report.md``/``report.html``; return the results by label.

    Labels are ``<model>`` (paper protocol: member thresholds F1-optimal on the test fold, 2-of-3 vote) and
    ``<model> [honest]`` (member thresholds chosen on an inner split of the training fold). Lesions with
    ``n/a`` labels are left out of the metrics but kept in ``oof.parquet``, which is written (atomically)
    for every model with members, even when its metrics cannot be computed.
    """
    from qsmrim.evaluation import evaluate_predictions, write_report

    run_dir = Path(run_dir)
    by_model: dict[str, list[Member]] = defaultdict(list)
    for model, _fold, _seed, folder in iter_member_dirs(run_dir):
        by_model[model].append(Member.load(folder))
    if not by_model:
        raise FileNotFoundError(f"{run_dir}: no trained members (<model>/fold_<k>/seed_<s>/member.json)")
    results: dict[str, Any] = {}
    tables: list[pd.DataFrame] = []
    for model, members in sorted(by_model.items()):
        if all("paper" in m.thresholds for m in members):
            tables.append(oof_table(members).assign(model=model))
        for protocol in ("paper", "honest"):
            if not all(protocol in m.thresholds for m in members):
                continue
            ens = fold_ensemble_predictions(members, protocol)
            ens = ens[ens["rim"] >= 0]
            label = model if protocol == "paper" else f"{model} [honest]"
            try:
                res = evaluate_predictions(ens, protocol="given", method=model)
            except ValueError as exc:
                log.warning("cannot evaluate %s: %s", label, exc)
                continue
            res["protocol"] = protocol
            res["protocol_note"] = ("member thresholds maximise F1 on the test fold (paper 2.5), 2-of-3 vote"
                                    if protocol == "paper" else
                                    "member thresholds chosen on an inner split of the training fold, 2-of-3 vote")  # fmt: skip
            res["n_members"] = len(members)
            results[label] = res
    out = Path(out_dir) if out_dir is not None else RunLayout(run_dir).evaluation
    oof = None
    if tables:
        path = _write_oof(tables, out)
        log.info("wrote %s (%d rows)", path, sum(len(t) for t in tables))
        oof = pd.read_parquet(path)
    if results:
        write_report(results, out, title=f"qsmrim evaluation: {run_dir.name}", with_figures=with_figures, oof=oof,
                     volumes=_cohort_volumes(run_dir) if with_figures and oof is not None else None)  # fmt: skip
    return results


def _cohort_volumes(run_dir: Path) -> Callable[[str], SubjectVolumes] | None:
    """Scan id -> volumes of the run's cohort, for the report's lesion thumbnails: the config's ``data.root``,
    else the synthesized ``prepared/cohort``; None (report without thumbnails) when it is not there."""
    from qsmrim.data import LesionSource, discover_cohort, load_subject

    root, data = None, {}
    cfg = RunLayout(run_dir).config
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text()).get("data") or {}
            root = data.get("root")
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("%s unreadable (%s); looking for the cohort in prepared/cohort", cfg, exc)
    root = Path(root) if root else RunLayout(run_dir).synth_cohort
    try:
        default = LesionSource()
        lesions = LesionSource(data.get("lesions_from") or default.folder, data.get("lesions_desc") or default.desc)
        files = {s.subject: s for s in discover_cohort(root, lesions=lesions).subjects}
    except (OSError, ValueError) as exc:
        log.warning("no lesion thumbnails in the report: the run's cohort %s is not readable (%s)", root, exc)
        return None
    return lambda scan: load_subject(files[scan])


def _write_oof(tables: list[pd.DataFrame], out: Path) -> Path:
    """One Parquet file for all models (``model`` first; a seed column a model lacks is missing), temp then
    rename so a reader never sees half a file."""
    oof = pd.concat(tables, ignore_index=True)
    seeds = sorted((c for c in oof.columns if c.startswith("prob_seed")), key=lambda c: int(c[len("prob_seed"):]))
    rest = [c for c in oof.columns if c not in seeds and c not in ("model", "subject", "lesion", "fold", "rim")]
    lead = ["model", "subject", "lesion", "fold", "rim"]
    oof = oof[lead + seeds + rest]
    for col in ("n_members", "votes", "rim_pred", "votes_honest", "rim_pred_honest"):
        if col in oof.columns:
            oof[col] = oof[col].astype("Int64")  # a model without honest thresholds leaves them missing
    with atomic_path(out / OOF_FILE) as tmp:
        oof.to_parquet(tmp, index=False)
    return out / OOF_FILE
