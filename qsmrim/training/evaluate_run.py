"""Evaluate a finished run: fold ensembles of every model, both threshold protocols, one report."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from qsmrim.training.ensemble import fold_ensemble_predictions
from qsmrim.training.layout import iter_member_dirs
from qsmrim.training.member import Member

__all__ = ["evaluate_run"]

log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, out_dir: str | Path | None = None, *, with_figures: bool = True) -> dict[str, Any]:
    """Evaluate every model of a run and write ``report.md``/``report.html``; return the results by label.

    Labels are ``<model>`` (paper protocol: member thresholds F1-optimal on the test fold, 2-of-3 vote) and
    ``<model> [honest]`` (member thresholds chosen on an inner split of the training fold). Lesions with
    ``n/a`` labels are left out of the metrics.
    """
    from qsmrim.evaluation import evaluate_predictions, write_report

    run_dir = Path(run_dir)
    by_model: dict[str, list[Member]] = defaultdict(list)
    for model, _fold, _seed, folder in iter_member_dirs(run_dir):
        by_model[model].append(Member.load(folder))
    if not by_model:
        raise FileNotFoundError(f"{run_dir}: no trained members (<model>/fold_<k>/seed_<s>/member.json)")
    results: dict[str, Any] = {}
    for model, members in sorted(by_model.items()):
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
    out = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    if results:
        write_report(results, out, title=f"qsmrim evaluation: {run_dir.name}", with_figures=with_figures)
    return results
